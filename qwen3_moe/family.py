"""The Qwen3-MoE family table (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, Qwen2-MoE's routed experts
without a shared expert.

Attention is Qwen3's: per-head RMSNorm of queries and keys (``self_attn.q_norm`` / ``k_norm`` ->
megatron-core's ``q_layernorm`` / ``k_layernorm``), an explicit ``head_dim`` (``kv_channels``), and with
``attention_bias`` biased q, k, v and o_proj (o_proj's must be zero: Megatron biases qkv alone). Expert
layers (``decoder_sparse_step``, ``mlp_only_layers``, as in Qwen2-MoE) hold a router and routed experts
(``num_experts``, ``moe_intermediate_size``), and the router renormalises its top-k with ``norm_topk_prob``
(megatron-core's ``moe_router_pre_softmax`` = not norm_topk_prob). A sliding window applies to every layer.
Megatron-Bridge (0.6.2, ``qwen3_moe_bridge.py``) writes these models as its generic ``GPTModelProvider``.
"""
from __future__ import annotations

from typing import Any

from checkpoint_convert.model import BridgeProvider, GPT_PROVIDER, ModelArch, every_layer_window_kwargs, register
from llama.family import ATTENTION, DENSE_MLP, is_llama_like, llama_like_family
from mixtral.family import MOE
from qwen2_moe.family import SPARSE_KEYS, old_layout_aliases, routed_experts, routed_experts_kwargs
from qwen3.family import QK_NORM


def _config_extras(arch: ModelArch) -> dict[str, Any]:
    return dict(routed_experts_kwargs(arch), attention_bias=arch.add_qkv_bias,
                use_sliding_window=arch.window_size is not None, **every_layer_window_kwargs(arch))


def matches_megatron(arch: ModelArch) -> bool:
    return (is_llama_like(arch, qk_norm=True, experts=True) and not arch.add_bias_linear
            and arch.moe_shared_expert_intermediate_size is None and arch.window_layers is None)


QWEN3_MOE = register(llama_like_family(
    "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", extra_keys=SPARSE_KEYS, config_extras=_config_extras,
    layer=ATTENTION + QK_NORM + DENSE_MLP + MOE, fixed={"qk_layernorm": True}, matches=matches_megatron,
    bridge=BridgeProvider(writes=GPT_PROVIDER), arch_extras=routed_experts, hf_aliases=old_layout_aliases))
