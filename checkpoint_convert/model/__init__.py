"""Layer 2, model: what a model is, independent of any file format.

Owns the architecture description (``arch.ModelArch``), the declarative family tables and their registry
(``family``: ``FamilySpec``, ``Param``, ``Layers``, the shared transforms) and tensor/pipeline/expert
parallel math (``parallel``: styles, splits, vocab padding, stages). May import ``base`` only.

Family packages import only the names this module exports: it is the core's interface to them.
"""
from ..base.errors import BadInputError
from ..base.runtime import transformers_attr
from .arch import LAYER_KINDS, LatentAttention, MambaSizes, ModelArch
from .family import (
    FULL,
    GPT_PROVIDER,
    SLIDING,
    BridgeProvider,
    FamilySpec,
    Layers,
    Param,
    Tensors,
    Tower,
    TowerLayout,
    every_layer_window_kwargs,
    gate_up_to_hf,
    gate_up_to_megatron,
    in_layout,
    moe_layers_from_hf_config,
    norm_topk_prob,
    pack_qkv,
    per_expert_aliases,
    per_layer_window_kwargs,
    qkv_to_hf,
    qkv_to_megatron,
    register,
    registered,
    softmax_routing,
    sparse_step_kwargs,
    unpack_qkv,
    window_from_hf_config,
)
from .parallel import Style, cat, stack

__all__ = [
    "FULL",
    "SLIDING",
    "BadInputError",
    "BridgeProvider",
    "FamilySpec",
    "GPT_PROVIDER",
    "LAYER_KINDS",
    "LatentAttention",
    "Layers",
    "MambaSizes",
    "ModelArch",
    "Param",
    "Style",
    "Tensors",
    "Tower",
    "TowerLayout",
    "in_layout",
    "cat",
    "every_layer_window_kwargs",
    "gate_up_to_hf",
    "gate_up_to_megatron",
    "moe_layers_from_hf_config",
    "norm_topk_prob",
    "pack_qkv",
    "per_expert_aliases",
    "per_layer_window_kwargs",
    "qkv_to_hf",
    "qkv_to_megatron",
    "register",
    "registered",
    "softmax_routing",
    "sparse_step_kwargs",
    "stack",
    "transformers_attr",
    "unpack_qkv",
    "window_from_hf_config",
]
