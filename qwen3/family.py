"""The Qwen3 family table: Llama's, plus per-head query and key norms.

Qwen3 normalises each query and key head (RMSNorm over ``head_dim``, before rotary embedding) with
one weight shared by all heads: ``self_attn.q_norm.weight`` and ``k_norm.weight`` [head_dim], which
megatron-core calls ``self_attention.q_layernorm.weight`` / ``k_layernorm.weight`` (``qk_layernorm``;
the same names in the Transformer Engine and local specs, replicated across tensor-parallel ranks).
``head_dim`` is set explicitly and usually differs from hidden_size / heads: Megatron's
``kv_channels``. No qkv bias unless ``attention_bias`` (which, as in Llama, also biases o_proj).
The legacy Megatron model has no query/key norm: the core refuses ``--megatron_format legacy``.
"""
from __future__ import annotations

from typing import Any

from checkpoint_convert.model import (BridgeProvider, GPT_PROVIDER, ModelArch, Param, Style, per_layer_window_kwargs,
                                      register)
from llama.family import ATTENTION, DENSE_MLP, is_llama_like, llama_like_family

QK_NORM = (
    Param("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), Style.REPLICATED),
    Param("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), Style.REPLICATED),
)


def matches_megatron(arch: ModelArch) -> bool:
    return is_llama_like(arch, qk_norm=True) and not arch.add_bias_linear


def config_extras(arch: ModelArch) -> dict[str, Any]:
    return {"attention_bias": arch.add_qkv_bias, **per_layer_window_kwargs(arch)}


QWEN3 = register(llama_like_family(
    "qwen3", "Qwen3Config", "Qwen3ForCausalLM", extra_keys=("max_window_layers",), config_extras=config_extras,
    layer=ATTENTION + QK_NORM + DENSE_MLP, fixed={"qk_layernorm": True}, matches=matches_megatron,
    bridge=BridgeProvider(writes=GPT_PROVIDER)))
