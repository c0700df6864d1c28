"""Megatron-LM ``args`` Namespace <-> :class:`ModelArch`.

Megatron args are family-agnostic, so this lives in the core. Reading prefers what the tensors
prove: callers cross-check shapes against these values (see ``megatron_io``).
"""
from __future__ import annotations

import argparse
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..base.errors import BadInputError
from ..model.arch import LatentAttention, ModelArch
from .hf_io import tokenizer_files
from .hybrid import hybrid_args, hybrid_fields

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
    if _get(args, "quick_geglu", default=False):
        return "quick_geglu"
    if _get(args, "swiglu", default=False):
        return "swiglu"
    if _get(args, "squared_relu", default=False):
        return "squared_relu"
    if _get(args, "bias_gelu_fusion", default=False):
        return "gelu_fast"
    if _get(args, "openai_gelu", default=False):
        return "gelu_new"
    return "gelu"


def _position_embedding_type(args: Any) -> str:
    kind = _get(args, "position_embedding_type")
    if kind is None:
        kind = "rope" if _get(args, "use_rotary_position_embeddings", default=False) else "learned_absolute"
    return "rope" if kind == "yarn" else kind  # YaRN is a rope scaling (_yarn_scaling)


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
        **_moe_routing(args, _whole(args, source, "num_layers"), source),
        attention_dropout=_real(args, source, "attention_dropout", default=0.1),  # Megatron-LM's defaults
        hidden_dropout=_real(args, source, "hidden_dropout", default=0.1),
        qk_layernorm=bool(_get(args, "qk_layernorm", default=False)),
        mla=_latent_attention(args, source),
        **_sliding_window(args, _whole(args, source, "num_layers"), source),
        **_sinks_and_gated_unit(args, source),
        params_dtype=_args_dtype(args),
        extra=_mapping(_get(args, "hf_extra_config"), "hf_extra_config", source),
        mtp_num_layers=_whole(args, source, "mtp_num_layers", default=0) if _get(args, "mtp_num_layers") else 0,
        # multi-latent attention rotates its own rotary rows (qk_pos_emb_head_dim) whatever rotary_percent says
        rotary_percent=1.0 if _get(args, "multi_latent_attention") else _real(args, source, "rotary_percent",
                                                                              default=1.0),
        **hybrid_fields(args, _whole(args, source, "num_layers"), hidden, source),
        moe_latent_size=_whole(args, source, "moe_latent_size"),
        mrope_section=_mrope_section(args, source, _whole(args, source, "kv_channels", default=hidden // heads)),
    )


def _mrope_section(args: Any, source: str, kv_channels: int) -> tuple[int, ...] | None:
    """megatron-core's ``mrope_section`` (multimodal rotary sections), for ``position_embedding_type`` mrope: the
    sections share a head's rotary frequency pairs, so they must sum to half its size (Megatron-Bridge 0.6.2's
    Qwen2.5-VL import writes its provider's default [16, 24, 24] whatever the model's head size)."""
    section = _get(args, "mrope_section")
    if section is None:
        return None
    if not isinstance(section, (list, tuple)) or not all(isinstance(n, int) and n > 0 for n in section):
        raise BadInputError(f"mrope_section is {section!r}, not a list of positive whole numbers", source)
    if sum(section) * 2 != kv_channels:
        raise BadInputError(f"mrope_section {list(section)} covers {sum(section)} rotary pairs, but heads of "
                            f"{kv_channels} channels have {kv_channels // 2}", source)
    return tuple(section)


def _latent_attention(args: Any, source: str) -> LatentAttention | None:
    """Multi-latent attention sizes (Megatron-LM's ``--multi-latent-attention`` and ``_add_mla_args``)."""
    if not _get(args, "multi_latent_attention", default=False):
        return None
    q_lora_rank = _get(args, "q_lora_rank")
    return LatentAttention(
        q_lora_rank=None if q_lora_rank is None else whole_number(q_lora_rank, "q_lora_rank", source),
        **{name: _whole(args, source, name, default=default) for name, default in (
            ("kv_lora_rank", 32), ("qk_head_dim", 128), ("qk_pos_emb_head_dim", 64), ("v_head_dim", 128))})


def _latent_attention_args(arch: ModelArch) -> dict[str, Any]:
    """Megatron-LM's multi-latent attention fields, and its YaRN fields (MLA's ``rope_type``) for a
    Hugging Face ``yarn`` rope scaling (HEAD spells the YaRN range fields with a ``yarn_`` prefix)."""
    if arch.mla is None:
        return {"multi_latent_attention": False}
    rope = arch.rope_scaling or {}
    yarn = rope.get("rope_type") == "yarn"
    original = rope.get("original_max_position_embeddings") if yarn else None
    beta_fast, beta_slow = (rope.get("beta_fast") or 32.0, rope.get("beta_slow") or 1.0) if yarn else (None, None)
    return dict(
        multi_latent_attention=True, q_lora_rank=arch.mla.q_lora_rank, kv_lora_rank=arch.mla.kv_lora_rank,
        qk_head_dim=arch.mla.qk_head_dim, qk_pos_emb_head_dim=arch.mla.qk_pos_emb_head_dim,
        v_head_dim=arch.mla.v_head_dim, rope_type="yarn" if yarn else "rope",
        rotary_scaling_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
        mscale=float(rope.get("mscale") or 1.0) if yarn else 1.0,
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0) if yarn else 0.0,
        original_max_position_embeddings=original, yarn_original_max_position_embeddings=original,
        beta_fast=beta_fast, beta_slow=beta_slow, yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow,
    )


def _yarn_scaling(args: Any, source: str) -> dict | None:
    """Hugging Face's ``yarn`` rope scaling of Megatron's YaRN fields: a multi-latent attention model's (its
    ``rope_type``), or a GPT model's ``position_embedding_type yarn`` (whose correction range is rounded to whole
    dimensions unless ``yarn_correction_range_round_to_int`` is false: Hugging Face's ``truncate``)."""
    if _get(args, "position_embedding_type") == "yarn" and not _get(args, "multi_latent_attention", default=False):
        return {**_yarn_fields(args, source),
                "truncate": bool(_get(args, "yarn_correction_range_round_to_int", default=True))}
    if not _get(args, "multi_latent_attention", default=False) or _get(args, "rope_type", default="yarn") != "yarn":
        return None
    return _yarn_fields(args, source)


def _yarn_fields(args: Any, source: str) -> dict:
    return {"rope_type": "yarn", "factor": _real(args, source, "rotary_scaling_factor", default=1.0),
            "original_max_position_embeddings": _whole(args, source, "yarn_original_max_position_embeddings",
                                                       "original_max_position_embeddings", default=4096),
            "beta_fast": _real(args, source, "yarn_beta_fast", "beta_fast", default=32.0),
            "beta_slow": _real(args, source, "yarn_beta_slow", "beta_slow", default=1.0),
            "mscale": _real(args, source, "mscale", default=1.0),
            "mscale_all_dim": _real(args, source, "mscale_all_dim", default=0.0)}


def _sinks_and_gated_unit(args: Any, source: str) -> dict[str, Any]:
    """Attention sinks (``softmax_type``) and the clamped, offset gated unit (``glu_linear_offset``,
    ``activation_func_clamp_value``): megatron-core's fields of the same names."""
    softmax = _get(args, "softmax_type", default="vanilla")
    if softmax not in ("vanilla", "learnable"):
        raise BadInputError(f"softmax_type is {softmax!r}: only 'vanilla' and 'learnable' (attention sinks) convert",
                            source)
    clamp = _get(args, "activation_func_clamp_value")
    return {"softmax_type": softmax, "glu_linear_offset": _real(args, source, "glu_linear_offset", default=0.0),
            "activation_func_clamp_value": None if clamp is None else real_number(clamp, "activation_func_clamp_value",
                                                                                   source)}


def _gpt_yarn_args(arch: ModelArch) -> dict[str, Any]:
    """Megatron-LM's YaRN args of a model without multi-latent attention (``--position-embedding-type yarn``)."""
    rope = arch.rope_scaling or {}
    if arch.mla is not None or rope.get("rope_type") != "yarn":
        return {}
    if rope.get("attention_factor") is not None:
        raise BadInputError(f"YaRN attention_factor {rope['attention_factor']}: megatron-core derives the attention "
                            "scale from the factor and mscale alone")
    return dict(position_embedding_type="yarn", use_rotary_position_embeddings=False,
                rotary_scaling_factor=float(rope["factor"]),
                yarn_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
                yarn_beta_fast=float(rope.get("beta_fast") or 32.0), yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                mscale=float(rope.get("mscale") or 1.0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
                yarn_correction_range_round_to_int=bool(rope.get("truncate", True)))


def _sliding_window(args: Any, num_layers: int, source: str) -> dict[str, Any]:
    """``window_size``/``window_layers`` from Megatron's ``window_size`` (left, right) and ``window_attn_skip_freq``.

    megatron-core lets a query at position i see keys i - left .. i + right: a causal window of
    ``left + 1`` tokens, Hugging Face's ``sliding_window``. The skip frequency is an int N (every Nth
    layer attends fully) or a per-layer list (1: sliding).
    """
    window = _get(args, "window_size")
    if not window:
        return {}
    if not isinstance(window, (list, tuple)) or len(window) != 2:
        raise BadInputError(f"window_size is {window!r}, not a (left, right) pair", source)
    left, right = (whole_number(part, "window_size", source, minimum=0) for part in window)
    if right != 0:
        raise BadInputError(f"window_size {tuple(window)} is not a causal sliding window (left >= 0, right 0)", source)
    skip = _get(args, "window_attn_skip_freq")
    if isinstance(skip, numbers.Integral):
        skip = whole_number(skip, "window_attn_skip_freq", source)
        skip = [int((layer + 1) % skip != 0) for layer in range(num_layers)]
    if skip is not None and (not isinstance(skip, (list, tuple)) or len(skip) != num_layers):
        raise BadInputError(f"window_attn_skip_freq is {skip!r}, not a list of num_layers={num_layers} entries", source)
    return {"window_size": left + 1, "window_layers": tuple(int(bool(x)) for x in skip) if skip is not None else None}


def _moe_layer_pattern(args: Any, num_layers: int, source: str) -> tuple[int, ...] | None:
    """``moe_layer_freq``: an int N (layer i has experts when i % N == 0, megatron-core's
    ``get_gpt_decoder_layer_specs``) or a per-layer list (1: experts); None when every layer has experts."""
    freq = _get(args, "moe_layer_freq", default=1)
    if isinstance(freq, numbers.Integral):
        freq = whole_number(freq, "moe_layer_freq", source)
        freq = [int(layer % freq == 0) for layer in range(num_layers)]
    if not isinstance(freq, (list, tuple)) or len(freq) != num_layers or not set(freq) <= {0, 1} or not any(freq):
        raise BadInputError(f"moe_layer_freq is {freq!r}, not a whole number or a list of num_layers={num_layers} "
                            "0s and 1s with at least one 1", source)
    return None if all(freq) else tuple(int(x) for x in freq)


def _moe_routing(args: Any, num_layers: int, source: str) -> dict[str, Any]:
    """Which layers have experts, how the router weighs them and the shared experts beside them."""
    if not _get(args, "num_experts"):
        return {}
    score = _get(args, "moe_router_score_function", default="softmax")
    if score not in ("softmax", "sigmoid"):
        raise BadInputError(f"moe_router_score_function is {score!r}, not softmax or sigmoid", source)
    expert_bias = bool(_get(args, "moe_router_enable_expert_bias", default=False))
    if expert_bias and score != "sigmoid":  # megatron-core's TransformerConfig refuses it too
        raise BadInputError(f"moe_router_enable_expert_bias with moe_router_score_function {score}: the expert bias "
                            "is a sigmoid router's", source)
    scaling = _get(args, "moe_router_topk_scaling_factor")
    shared = _get(args, "moe_shared_expert_intermediate_size")
    return dict(
        moe_layers=_moe_layer_pattern(args, num_layers, source), moe_router_score_function=score,
        moe_router_pre_softmax=bool(_get(args, "moe_router_pre_softmax", default=False)),
        moe_router_topk_scaling_factor=None if scaling is None else real_number(scaling, "moe_router_topk_scaling_factor",
                                                                                 source),
        moe_router_enable_expert_bias=expert_bias, **_router_groups(args, source),
        moe_shared_expert_intermediate_size=None if shared is None else whole_number(
            shared, "moe_shared_expert_intermediate_size", source),
        moe_shared_expert_gate=bool(_get(args, "moe_shared_expert_gate", default=False)) and shared is not None,
    )


def _router_groups(args: Any, source: str) -> dict[str, Any]:
    """Group-limited routing (``moe_router_num_groups`` groups, ``moe_router_group_topk`` of them chosen), checked as
    megatron-core's TransformerConfig checks it; none without ``moe_router_group_topk``, and none when every group is
    chosen (Megatron-Bridge writes one group of which one is chosen for a model without groups): that is no limit."""
    if not _get(args, "moe_router_group_topk"):
        return {}
    chosen = _whole(args, source, "moe_router_group_topk")
    groups = _whole(args, source, "moe_router_num_groups")
    experts = _whole(args, source, "num_experts")
    if groups is None or experts % groups or chosen > groups:
        raise BadInputError(f"moe_router_group_topk {chosen} needs moe_router_num_groups (now {groups}) dividing the "
                            f"{experts} experts and at least {chosen}", source)
    if chosen == groups:
        return {}
    return {"moe_router_num_groups": groups, "moe_router_group_topk": chosen}


def _window_args(arch: ModelArch) -> dict[str, Any]:
    """Megatron's fields for :func:`_sliding_window` (inverse)."""
    if arch.window_size is None:
        return {"window_size": None, "window_attn_skip_freq": None}
    layers = list(arch.window_layers) if arch.window_layers is not None else None
    return {"window_size": (arch.window_size - 1, 0), "window_attn_skip_freq": layers}


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
    if not recorded and _yarn_scaling(args, source):
        return _yarn_scaling(args, source)
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
    """Megatron's record of a pipeline's stages: first/last stage counts for an uneven pipeline, a full
    layout string (always with an uneven virtual pipeline, whose stages it lists in model order, or with a
    stage of no layers), and for an even virtual pipeline the layers per virtual stage.

    At most one of ``num_layers_per_virtual_pipeline_stage``, ``num_virtual_stages_per_pipeline_rank`` and
    ``pipeline_model_parallel_layout`` may be set (Megatron-LM ``arguments.validate_args``), and only the
    first is copied from a checkpoint by ``checkpointing.load_args_from_checkpoint``: without it
    ``validate_args`` drops the virtual pipeline size the loader just read."""
    even = {"decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
            "pipeline_model_parallel_layout": None, "num_virtual_stages_per_pipeline_rank": None,
            "num_layers_per_virtual_pipeline_stage": stages[0] if vpp > 1 and stages else None}
    if len(set(stages)) <= 1:
        return even
    first, *middle, last = stages
    if len(set(middle)) <= 1 and vpp == 1 and min(stages) > 0:  # megatron-core wants first/last counts > 0
        return {**even, "decoder_first_pipeline_num_layers": first, "decoder_last_pipeline_num_layers": last}
    parts = ["t" * count for count in stages]
    parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
    return {**even, "num_layers_per_virtual_pipeline_stage": None, "pipeline_model_parallel_layout": "|".join(parts)}


# Megatron-LM's --tokenizer-type choices (megatron/training/arguments.py ``_add_tokenizer_args`` in
# core_v0.17.1; ``TokenizerConfig.tokenizer_type`` in megatron/training/config/training_config.py at HEAD).
MEGATRON_TOKENIZER_TYPES = ("BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
                            "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                            "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")
HF_TOKENIZER = "HuggingFaceTokenizer"
# When nothing names the tokenizer: Megatron-LM's tokenizer of pre-tokenized data, which needs no files
# (it is built from --vocab-size), so loading works and nothing pretends to know the real tokenizer.
DEFAULT_TOKENIZER_TYPE = "NullTokenizer"


def tokenizer_fields(recorded_type: str | None, recorded_model: str | None, type_flag: str | None = None,
                     model_flag: str | None = None) -> dict[str, str | None]:
    """``tokenizer_type`` and ``tokenizer_model`` for the args: the flags', else what the source records
    (a Megatron source's own fields, or ``HuggingFaceTokenizer`` and its directory for a Hugging Face
    source), else :data:`DEFAULT_TOKENIZER_TYPE`. A model alone means a Hugging Face tokenizer; a recorded
    model is kept only with the type it was recorded with."""
    kind = type_flag or (HF_TOKENIZER if model_flag else recorded_type) or DEFAULT_TOKENIZER_TYPE
    model = model_flag or (recorded_model if kind == recorded_type else None)
    return {"tokenizer_type": kind, "tokenizer_model": model}


def tokenizer_for(hf_source: Path | None, base: dict, type_flag: str | None = None,
                  name_flag: str | None = None) -> dict[str, str | None]:
    """The args' tokenizer fields for a Hugging Face source directory (None: a Megatron source, whose
    fields are in ``base``), with a warning when they cannot name the tokenizer Megatron-LM will need.
    ``--tokenizer_name`` becomes Megatron-LM's --tokenizer-model: a local path made absolute, else as
    given (a hub name)."""
    model_flag = str(Path(name_flag).resolve()) if name_flag and Path(name_flag).exists() else name_flag
    if hf_source is None:
        recorded_type, recorded_model = base.get("tokenizer_type"), base.get("tokenizer_model")
    else:
        hf_source = hf_source.resolve()
        recorded_type, recorded_model = HF_TOKENIZER, str(hf_source) if tokenizer_files(hf_source) else None
    fields = tokenizer_fields(recorded_type, recorded_model, type_flag, model_flag)
    if not (recorded_type or type_flag or model_flag):
        warnings.warn(f"the source names no tokenizer: args record tokenizer_type {fields['tokenizer_type']}; "
                      "name it with --tokenizer_name (and --tokenizer_type)")
    elif fields["tokenizer_type"] == HF_TOKENIZER and not fields["tokenizer_model"]:
        warnings.warn("args name no tokenizer_model (the source holds no tokenizer files): pass --tokenizer_name, "
                      "or Megatron-LM's --tokenizer-model when you train")
    return fields


def with_context_length(arch: ModelArch, wanted: int | None) -> ModelArch:
    """``arch`` with ``--max_position_embeddings``; learned position embeddings have that many rows, so
    there it must be the source's."""
    if not wanted or wanted == arch.max_position_embeddings:
        return arch
    if arch.position_embedding_type == "learned_absolute":
        raise BadInputError(f"--max_position_embeddings {wanted}: this model's learned position embeddings have "
                            f"{arch.max_position_embeddings} rows")
    return arch.replace(max_position_embeddings=wanted)


@dataclass(frozen=True)
class CheckpointFacts:
    """What the args say about the files beside the architecture and layout, so that Megatron-LM's
    loaders (which take these from the checkpoint) build the model the files hold."""

    padded_vocab: int
    dtype: torch.dtype
    divisible_by: int
    impl: str  # "transformer_engine" or "local"
    ckpt_format: str = "torch"
    legacy: bool = False
    moe_grouped_gemm: bool = False
    distributed_optimizer: bool = False
    seq_length: int | None = None  # None: the source's, else max_position_embeddings
    tokenizer: dict = field(default_factory=dict)  # tokenizer_fields(...)


# Settings of a training run that a fresh checkpoint cannot know but Megatron-LM's loaders read from it:
# the values a converted model means (no sequence parallelism, no query-key layer scaling, no BERT binary
# head); a Megatron source's own values are kept.
_RUN_DEFAULTS = {"sequence_parallel": False, "apply_query_key_layer_scaling": False, "bert_binary_head": False,
                 "data_parallel_random_init": False, "spec": None}


def args_from_arch(arch: ModelArch, layout: ParallelLayout, facts: CheckpointFacts,
                   base: dict | None = None) -> argparse.Namespace:
    """Every field Megatron-LM's loaders read from a checkpoint's args (see tests/test_megatron_args_contract.py
    for the list and where each is read), describing this checkpoint.

    ``base`` holds plain-valued fields of a source checkpoint's args (training settings) to carry.
    """
    fields = dict(base or {})
    fields.update({name: value for name, value in _RUN_DEFAULTS.items() if fields.get(name) is None})
    fields.update(_architecture_fields(arch), **_moe_fields(arch, facts.moe_grouped_gemm))
    fields.update(_layout_fields(layout), **_pipeline_fields(layout.stages, layout.vpp))
    fields.update(hybrid_args(arch))
    fields.update(facts.tokenizer, **_vocab_and_dtype_fields(arch, facts))
    fields.update(
        seq_length=facts.seq_length or fields.get("seq_length") or arch.max_position_embeddings,
        transformer_impl=facts.impl, use_legacy_models=facts.legacy, use_mcore_models=not facts.legacy,
        ckpt_format=facts.ckpt_format, use_dist_ckpt=facts.ckpt_format != "torch",
        use_distributed_optimizer=facts.distributed_optimizer,
        # nothing but model weights is written: no optimizer or RNG state, no samples consumed
        no_save_optim=True, no_save_rng=True, iteration=0, mtp_num_layers=arch.mtp_num_layers or None,
        consumed_train_samples=0, skipped_train_samples=0, consumed_valid_samples=0,
    )
    if fields["seq_length"] > fields["max_position_embeddings"]:  # arguments.validate_args asserts it
        raise BadInputError(f"sequence length {fields['seq_length']} exceeds max_position_embeddings "
                            f"{fields['max_position_embeddings']} (Megatron-LM refuses that)")
    return argparse.Namespace(**fields)


def _architecture_fields(arch: ModelArch) -> dict[str, Any]:
    """The model's shape and numerics, in Megatron-LM's argument names."""
    rope = arch.rope_scaling or {}
    fields = dict(
        num_layers=arch.num_layers, encoder_num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size, num_attention_heads=arch.num_attention_heads,
        kv_channels=arch.kv_channels, group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, max_position_embeddings=arch.max_position_embeddings,
        position_embedding_type=arch.position_embedding_type,
        add_position_embedding=arch.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=arch.position_embedding_type == "rope",
        rotary_base=arch.rotary_base, rotary_percent=arch.rotary_percent, rotary_interleaved=False, hf_rope_scaling=arch.rope_scaling,
        use_rope_scaling=rope.get("rope_type") == "llama3", rope_scaling_factor=rope.get("factor", 8.0),
        normalization=arch.normalization, layernorm_epsilon=arch.norm_epsilon, norm_epsilon=arch.norm_epsilon,
        apply_layernorm_1p=False, swiglu=arch.activation == "swiglu", squared_relu=arch.activation == "squared_relu",
        quick_geglu=arch.activation == "quick_geglu", glu_linear_offset=arch.glu_linear_offset,
        activation_func_clamp_value=arch.activation_func_clamp_value, softmax_type=arch.softmax_type,
        openai_gelu=arch.activation == "gelu_new", bias_gelu_fusion=arch.activation == "gelu_fast",
        add_bias_linear=arch.add_bias_linear, disable_bias_linear=not arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias, untie_embeddings_and_output_weights=not arch.tie_embeddings,
        attention_dropout=arch.attention_dropout, hidden_dropout=arch.hidden_dropout,
        qk_layernorm=arch.qk_layernorm, **_window_args(arch), **_latent_attention_args(arch),
        hf_extra_config=dict(arch.extra), hf_family=arch.family,
        mrope_section=list(arch.mrope_section) if arch.mrope_section else None,
    )
    return {**fields, **_gpt_yarn_args(arch)}


def _moe_fields(arch: ModelArch, grouped_gemm: bool) -> dict[str, Any]:
    """Mixture-of-experts fields: which layers have experts (``moe_layer_freq``: 1, or a per-layer list), the
    router's score function, softmax before or after the top-k, groups, expert bias and scaling (megatron-core's
    ``topk_routing_with_score_function``), shared experts and their gate."""
    return dict(
        num_experts=arch.num_experts, moe_layer_freq=list(arch.moe_layers) if arch.moe_layers else 1,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=(arch.moe_ffn_hidden_size or arch.ffn_hidden_size) if arch.num_experts else None,
        moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if arch.num_experts else "none",
        moe_token_dispatcher_type="allgather", moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_score_function=arch.moe_router_score_function,
        moe_router_enable_expert_bias=arch.moe_router_enable_expert_bias,
        moe_router_num_groups=arch.moe_router_num_groups, moe_router_group_topk=arch.moe_router_group_topk,
        moe_router_topk_scaling_factor=arch.moe_router_topk_scaling_factor,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=arch.moe_shared_expert_gate, moe_grouped_gemm=grouped_gemm,
        moe_single_grouped_weight=False, moe_single_grouped_bias=False,
    )


def _layout_fields(layout: ParallelLayout) -> dict[str, Any]:
    """Parallel sizes; expert weights are split by the tensor-parallel size (expert TP = TP)."""
    return dict(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        transformer_pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.tp, data_parallel_size=layout.dp,
        world_size=layout.tp * layout.pp * layout.dp, rank=0,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
    )


def _vocab_and_dtype_fields(arch: ModelArch, facts: CheckpointFacts) -> dict[str, Any]:
    return dict(
        vocab_size=arch.vocab_size, orig_vocab_size=arch.vocab_size, padded_vocab_size=facts.padded_vocab,
        make_vocab_size_divisible_by=facts.divisible_by, params_dtype=facts.dtype,
        fp16=facts.dtype == torch.float16, bf16=facts.dtype == torch.bfloat16,
    )


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


def carried_fields(args: Any, source: Any) -> dict[str, Any]:
    """The :func:`plain_fields` a Megatron output carries from its source's args, those it computes with checked
    (a source's ``seq_length`` is compared with the context length it writes)."""
    fields = plain_fields(args)
    if fields.get("seq_length") is not None:
        fields["seq_length"] = whole_number(fields["seq_length"], "seq_length", source)
    return fields
