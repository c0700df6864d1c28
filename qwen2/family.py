"""The Qwen2 / Qwen2.5 family table: Llama's, less the output-projection bias.

Qwen2 always biases q, k and v and nothing else (no config flag): Megatron's ``add_qkv_bias``
without ``add_bias_linear``; Hugging Face has no ``o_proj`` bias, so Llama's zero-bias entry is left
out. Sliding windows (``use_sliding_window``, ``sliding_window``, and ``layer_types`` or
``max_window_layers`` for which layers slide) map to Megatron's ``window_size`` and a per-layer
``window_attn_skip_freq``. Small sizes tie their embeddings; ``rope_theta`` is 1e6.
"""
from __future__ import annotations

from checkpoint_convert.model import BridgeProvider, GPT_PROVIDER, ModelArch, per_layer_window_kwargs, register
from llama.family import DENSE_MLP, PRE_MLP_NORM, SELF_ATTENTION, is_llama_like, llama_like_family

LAYER = SELF_ATTENTION + PRE_MLP_NORM + DENSE_MLP


def matches_megatron(arch: ModelArch) -> bool:
    return is_llama_like(arch) and arch.add_qkv_bias and not arch.add_bias_linear


QWEN2 = register(llama_like_family(
    "qwen2", "Qwen2Config", "Qwen2ForCausalLM", extra_keys=("max_window_layers",),
    config_extras=per_layer_window_kwargs, layer=LAYER, fixed={"add_qkv_bias": True, "add_bias_linear": False},
    matches=matches_megatron, bridge=BridgeProvider(writes=GPT_PROVIDER)))
