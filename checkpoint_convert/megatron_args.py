"""Megatron-LM ``args`` Namespace <-> :class:`ModelArch`.

Megatron args are family-agnostic, so this lives in the core. Reading prefers what the tensors
prove: callers cross-check shapes against these values (see ``megatron_io``).
"""
from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .arch import ModelArch
from .errors import BadInputError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """``fp32``/``fp16``/``bf16`` -> torch dtype; None stays None (keep the source dtype)."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise BadInputError(f"unknown dtype '{name}' (choose from {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _get(args: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def whole_number(value: Any, name: str, source: Any, minimum: int = 1) -> int:
    """``value`` as an int when it is a whole number of at least ``minimum``; else bad input naming ``name``.

    Numbers read from a file are checked before any arithmetic uses them (a 0 would divide by zero, a
    string or a negative size would fail far from its cause).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BadInputError(f"{name} is {value!r}, not a whole number of at least {minimum}", source)
    return int(value)


def real_number(value: Any, name: str, source: Any) -> float:
    """``value`` as a float when it is a finite real number; else bad input naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadInputError(f"{name} is {value!r}, not a number", source)
    return float(value)


def _whole(args: Any, source: str, *names: str, default: Any = None) -> int | None:
    """The first of ``names`` the args set, checked by :func:`whole_number` (``default`` when none is set)."""
    for name in names:
        if getattr(args, name, None) is not None:
            return whole_number(getattr(args, name), name, source)
    return default


def _real(args: Any, source: str, *names: str, default: float) -> float:
    for name in names:
        if getattr(args, name, None) is not None:
            return real_number(getattr(args, name), name, source)
    return default


def _activation(args: Any) -> str:
    if _get(args, "swiglu", default=False):
        return "swiglu"
    if _get(args, "bias_gelu_fusion", default=False):
        return "gelu_fast"
    if _get(args, "openai_gelu", default=False):
        return "gelu_new"
    return "gelu"


def _position_embedding_type(args: Any) -> str:
    kind = _get(args, "position_embedding_type")
    if kind is None:
        kind = "rope" if _get(args, "use_rotary_position_embeddings", default=False) else "learned_absolute"
    return kind


def true_vocab_size(args: Any, override: int | None = None) -> int | None:
    """The unpadded vocab: a user override, else what the args recorded, else None."""
    return override or _get(args, "orig_vocab_size", "true_vocab_size", "vocab_size")


def arch_from_args(args: Any, source: str, vocab_override: int | None = None) -> ModelArch:
    """Build the architecture from a checkpoint's args (family left empty for detection)."""
    required = ("num_layers", "hidden_size", "num_attention_heads")
    missing = [name for name in required if _get(args, name) is None]
    if missing:
        raise BadInputError(f"args lack {', '.join(missing)}", source)
    heads = _whole(args, source, "num_attention_heads")
    hidden = _whole(args, source, "hidden_size")
    groups = heads
    if _get(args, "group_query_attention", default=False):
        groups = _whole(args, source, "num_query_groups", default=heads)
    num_experts = _get(args, "num_experts")
    if num_experts:  # None or 0: a dense model
        num_experts = _whole(args, source, "num_experts")
    ffn = _whole(args, source, "ffn_hidden_size", default=4 * hidden)
    vocab = vocab_override or _whole(args, source, "orig_vocab_size", "true_vocab_size", "vocab_size",
                                     "padded_vocab_size")
    if vocab is None:
        raise BadInputError("args record no vocab size (orig_vocab_size, vocab_size or padded_vocab_size); "
                            "pass --vocab_size", source)
    return ModelArch(
        family="",
        num_layers=_whole(args, source, "num_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=_whole(args, source, "kv_channels", default=hidden // heads),
        ffn_hidden_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=_whole(args, source, "max_position_embeddings", "seq_length", default=2048),
        norm_epsilon=_real(args, source, "layernorm_epsilon", "norm_epsilon", default=1e-5),
        tie_embeddings=not _get(args, "untie_embeddings_and_output_weights", default=False),
        normalization=_get(args, "normalization", default="LayerNorm"),
        activation=_activation(args),
        position_embedding_type=_position_embedding_type(args),
        rotary_base=_real(args, source, "rotary_base", default=10000.0),
        rope_scaling=_rope_scaling(args, source),
        add_bias_linear=bool(_get(args, "add_bias_linear", default=True)),
        add_qkv_bias=bool(_get(args, "add_qkv_bias", default=False) or _get(args, "add_bias_linear", default=True)),
        num_experts=num_experts or None,
        moe_router_topk=_whole(args, source, "moe_router_topk", default=2),
        moe_ffn_hidden_size=_whole(args, source, "moe_ffn_hidden_size"),
        moe_aux_loss_coeff=_real(args, source, "moe_aux_loss_coeff", default=0.0),
        params_dtype=_args_dtype(args),
        extra=_mapping(_get(args, "hf_extra_config"), "hf_extra_config", source),
    )


def _mapping(value: Any, name: str, source: str) -> dict:
    if value is not None and not isinstance(value, dict):
        raise BadInputError(f"{name} is {type(value).__name__}, not a mapping", source)
    return dict(value or {})


def _rope_scaling(args: Any, source: str) -> dict | None:
    """Hugging Face rope scaling: as recorded by this tool, else Megatron's Llama 3 scaling flag.

    Megatron's ``use_rope_scaling`` applies Llama 3.1 scaling with fixed low/high frequency factors
    (1 and 4) and an original context of 8192 tokens; only the factor is an argument.
    """
    recorded = _get(args, "hf_rope_scaling")
    if recorded or not _get(args, "use_rope_scaling", default=False):
        return _mapping(recorded, "hf_rope_scaling", source) or None
    return {"rope_type": "llama3", "factor": _real(args, source, "rope_scaling_factor", default=8.0),
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _args_dtype(args: Any) -> torch.dtype:
    dtype = _get(args, "params_dtype")
    if isinstance(dtype, torch.dtype):
        return dtype
    if _get(args, "bf16", default=False):
        return torch.bfloat16
    if _get(args, "fp16", default=False):
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class ParallelLayout:
    """A target layout: tensor, pipeline, expert and data parallel.

    ``stages`` holds the layer counts of all ``pp * vpp`` pipeline stages in model order; with a
    virtual pipeline (``vpp`` model chunks per pipeline rank), stage ``s`` is chunk ``s // pp`` of
    pipeline rank ``s % pp``.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    stages: tuple[int, ...] = ()
    vpp: int = 1


def _pipeline_fields(stages: Sequence[int], vpp: int) -> dict[str, Any]:
    """Megatron's record of an uneven pipeline: first/last stage counts, or a full layout string (always
    the layout string with a virtual pipeline, whose stages it lists in model order, or with a stage
    of no layers)."""
    if len(set(stages)) <= 1:
        return {"decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
                "pipeline_model_parallel_layout": None}
    first, *middle, last = stages
    if len(set(middle)) <= 1 and vpp == 1 and min(stages) > 0:  # megatron-core wants first/last counts > 0
        return {"decoder_first_pipeline_num_layers": first, "decoder_last_pipeline_num_layers": last,
                "pipeline_model_parallel_layout": None}
    parts = ["t" * count for count in stages]
    parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
    return {"decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
            "pipeline_model_parallel_layout": "|".join(parts)}


def args_from_arch(arch: ModelArch, layout: ParallelLayout, padded_vocab: int, dtype: torch.dtype,
                   divisible_by: int, impl: str, base: dict | None = None) -> argparse.Namespace:
    """Every architecture and parallel field Megatron-LM reads when loading a checkpoint.

    ``base`` holds plain-valued fields of a source checkpoint's args (training settings) to carry.
    """
    fields = dict(base or {})
    fields.update(
        num_layers=arch.num_layers, encoder_num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size, num_attention_heads=arch.num_attention_heads,
        kv_channels=arch.kv_channels, group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, max_position_embeddings=arch.max_position_embeddings,
        seq_length=fields.get("seq_length") or arch.max_position_embeddings,
        position_embedding_type=arch.position_embedding_type,
        add_position_embedding=arch.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=arch.position_embedding_type == "rope",
        rotary_base=arch.rotary_base, rotary_percent=1.0, hf_rope_scaling=arch.rope_scaling,
        use_rope_scaling=(arch.rope_scaling or {}).get("rope_type") == "llama3",
        rope_scaling_factor=(arch.rope_scaling or {}).get("factor", 8.0),
        normalization=arch.normalization, layernorm_epsilon=arch.norm_epsilon, norm_epsilon=arch.norm_epsilon,
        swiglu=arch.activation == "swiglu", openai_gelu=arch.activation == "gelu_new",
        bias_gelu_fusion=arch.activation == "gelu_fast", add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias, untie_embeddings_and_output_weights=not arch.tie_embeddings,
        num_experts=arch.num_experts, moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size, moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if arch.num_experts else "none",
        moe_token_dispatcher_type=fields.get("moe_token_dispatcher_type") or "allgather",
        hf_extra_config=dict(arch.extra),
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        transformer_pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
        data_parallel_size=layout.dp, world_size=layout.tp * layout.pp * layout.dp, rank=0,
        vocab_size=arch.vocab_size, orig_vocab_size=arch.vocab_size, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by, params_dtype=dtype,
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_virtual_stages_per_pipeline_rank=layout.vpp if layout.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=None,
        transformer_impl=impl, ckpt_format="torch", consumed_train_samples=0, consumed_valid_samples=0,
        iteration=0, hf_family=arch.family,
        **_pipeline_fields(layout.stages, layout.vpp),
    )
    return argparse.Namespace(**fields)


PLAIN_TYPES = (str, int, float, bool, type(None))


def plain_fields(args: Any) -> dict[str, Any]:
    """The fields of a source Namespace whose values are plain data (no foreign objects)."""
    def plain(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(item) for item in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return isinstance(value, PLAIN_TYPES) or isinstance(value, torch.dtype)
    return {name: value for name, value in vars(args).items() if plain(value)}
