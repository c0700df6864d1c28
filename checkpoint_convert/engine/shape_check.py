"""Every architecture number checked against the tensors a source holds, before anything is written.

A conversion lays tensors out by numbers read from a file (``config.json``, Megatron ``args``): query
heads, query groups and head size pack QKV, the vocab pads the embedding, and the output records them
all. A number that disagrees with the tensors would give an output that looks right and is not, so:

1. :func:`check_config_sizes` / :func:`validate_arch`: positive whole numbers and divisibility, before
   any arithmetic uses them (a 0 divides by zero, a string fails far from its cause).
2. :func:`expected_shape`: the shape each full Megatron-layout tensor must have, from the architecture and
   the tensor's megatron-core module name alone. megatron-core's GPT model is one architecture for every
   family (``linear_qkv`` rows are (heads + 2 x groups) x head size, a norm is hidden wide, ...); a name it
   does not know (a family's new module) is left to the walk itself.
3. :func:`check_against_tensors`: the planning walk on ``meta`` tensors under the source's architecture;
   every full tensor must have its expected shape (a Hugging Face source's stored tensors also what the
   family's ``to_hf`` makes of it), every source tensor must be read. On a misfit, each numeric field of
   the source is tried with the numbers its tensors show, read again through the source's own reader,
   to name the field that is wrong, its value and the value the tensors fit.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Iterable

import torch

from ..base.errors import BadInputError, reason
from ..formats import megatron_schema as schema
from ..model.arch import ModelArch
from .mtp import mtp_layer_params
from .streams import MTP, Item, walk

# How a number is spelled in config.json (transformers' standard names, and GPT-2's); in Megatron args
# every number has the architecture's own name.
HF_NAMES = {
    "num_layers": ("num_hidden_layers", "n_layer"), "hidden_size": ("hidden_size", "n_embd"),
    "num_attention_heads": ("num_attention_heads", "n_head"), "num_query_groups": ("num_key_value_heads",),
    "kv_channels": ("head_dim",), "ffn_hidden_size": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",), "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"), "moe_router_topk": ("num_experts_per_tok",),
    "moe_ffn_hidden_size": ("moe_intermediate_size", "intermediate_size"),
    "moe_shared_expert_intermediate_size": ("shared_expert_intermediate_size",),
    "norm_epsilon": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"), "rotary_base": ("rope_theta",),
}
HF_SIZE_KEYS = tuple(sorted({name for field, names in HF_NAMES.items() for name in names
                             if field not in ("norm_epsilon", "rotary_base")} | {"n_ctx"}))
SIZES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
         "vocab_size", "max_position_embeddings")
MOE_SIZES = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
OPTIONAL_SIZES = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")  # None: ffn_hidden_size / none
_MAX_REREADS = 20000  # bounds the search for the wrong field on very large inputs


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_MAY_BE_ZERO = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size")  # a dense model's config may say 0 experts


def check_config_sizes(values: dict[str, Any], file: Any) -> None:
    """config.json's size fields, when set, must be whole numbers of at least 1 (before a class divides)."""
    for key in HF_SIZE_KEYS:
        value, minimum = values.get(key), 0 if key in _MAY_BE_ZERO else 1
        if value is not None and (not _whole(value) or value < minimum):
            raise BadInputError(f"{key} is {value!r}, not a whole number of at least {minimum}", file)


# Megatron args fields read for an architecture number under another name (the first one set is read).
MEGATRON_NAMES = {
    "norm_epsilon": ("layernorm_epsilon", "norm_epsilon"),
    "vocab_size": ("orig_vocab_size", "true_vocab_size", "vocab_size", "padded_vocab_size"),
    "max_position_embeddings": ("max_position_embeddings", "seq_length"),
}


def field_name(field: str, values: dict[str, Any], names: dict[str, tuple[str, ...]]) -> str:
    """The source's name for an architecture number: the first of its spellings the file sets (also one
    level down, as ``rope_parameters.rope_theta``), else the architecture's own name."""
    for key in names.get(field, ()):
        if values.get(key) is not None:
            return key
        nested = next((f"{outer}.{key}" for outer, inner in values.items()
                       if isinstance(inner, dict) and inner.get(key) is not None), None)
        if nested:
            return nested
    return field


def arch_problem(arch: ModelArch, experts: bool = False) -> tuple[str, str] | None:
    """(field, what is wrong) for the first number out of range or not dividing as it must; None if none.

    ``experts``: the family's table has expert tensors, so the model must have experts.
    """
    sizes = SIZES + (MOE_SIZES if arch.num_experts or experts else ())
    for field in sizes:
        value = getattr(arch, field)
        if field in OPTIONAL_SIZES and value is None:
            continue
        if not _whole(value) or value < 1:
            return field, f"is {value!r}, not a whole number of at least 1"
    for field in ("norm_epsilon", "rotary_base"):
        value = getattr(arch, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            return field, f"is {value!r}, not a positive number"
    if arch.num_attention_heads % arch.num_query_groups:
        return "num_query_groups", (f"is {arch.num_query_groups}, which does not divide num_attention_heads="
                                    f"{arch.num_attention_heads}")
    if arch.num_experts and arch.moe_router_topk > arch.num_experts:
        return "moe_router_topk", f"is {arch.moe_router_topk}, more than the {arch.num_experts} experts"
    return None


def has_experts(family: Any, arch: ModelArch) -> bool:
    return any(param.experts for param in family.params_for("layer", arch))


def validate_arch(arch: ModelArch, family: Any, file: Any, values: dict[str, Any],
                  names: dict[str, tuple[str, ...]]) -> None:
    """Refuse an architecture with a number out of range, naming the field as the file spells it
    (``names``: :data:`HF_NAMES` or :data:`MEGATRON_NAMES`)."""
    problem = arch_problem(arch, has_experts(family, arch))
    if problem:
        field, reason = problem
        raise BadInputError(f"{field_name(field, values, names)} {reason}", file)


def _glu(arch: ModelArch) -> int:
    """Row multiple of a first MLP projection: gated linear units (SwiGLU, GeGLU) fuse gate and up."""
    return 2 if arch.activation.endswith("glu") else 1


def _qkv_rows(arch: ModelArch) -> int:
    return (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels


def _moe_ffn(arch: ModelArch) -> int:
    return arch.moe_ffn_hidden_size or arch.ffn_hidden_size


def _value_width(arch: ModelArch) -> int:
    """Width of the attention output (heads x value head size) that ``linear_proj`` reads."""
    return arch.num_attention_heads * (arch.mla.v_head_dim if arch.mla else arch.kv_channels)


def _q_norm_width(arch: ModelArch) -> int:
    """A query norm's width: each head (qk_layernorm), or multi-latent attention's query latent."""
    return arch.mla.q_lora_rank if arch.mla and arch.mla.q_lora_rank else arch.kv_channels


# multi-latent attention (``arch.mla`` is set wherever these modules exist)
_MLA_SHAPES: tuple[tuple[str, Callable[[ModelArch], tuple[int | None, ...]]], ...] = (
    (r"linear_q_down_proj\.weight", lambda a: (a.mla.q_lora_rank, a.hidden_size)),
    (r"linear_q_up_proj\.weight", lambda a: (a.num_attention_heads * a.mla.q_head_dim, a.mla.q_lora_rank)),
    (r"linear_q_proj\.weight", lambda a: (a.num_attention_heads * a.mla.q_head_dim, a.hidden_size)),
    (r"linear_kv_down_proj\.weight", lambda a: (a.mla.kv_lora_rank + a.mla.qk_pos_emb_head_dim, a.hidden_size)),
    (r"linear_kv_up_proj\.weight",
     lambda a: (a.num_attention_heads * (a.mla.qk_head_dim + a.mla.v_head_dim), a.mla.kv_lora_rank)),
    (r"kv_layernorm\.weight", lambda a: (a.mla.kv_lora_rank,)),
)


def _shared_ffn(arch: ModelArch, multiple: int = 1) -> int | None:
    """A shared expert's ffn size (times ``multiple``); None (left to the walk) when the architecture has none."""
    size = arch.moe_shared_expert_intermediate_size
    return None if size is None else multiple * size


def _expert_width(arch: ModelArch) -> int:
    """What routed experts read and write: the latent size when projections surround them, else hidden."""
    return arch.moe_latent_size or arch.hidden_size


# hybrid models' Mamba-2 mixers (``arch.mamba`` is set wherever these modules exist) and latent expert projections
_HYBRID_SHAPES: tuple[tuple[str, Callable[[ModelArch], tuple[int | None, ...]]], ...] = (
    (r"mixer\.in_proj\.weight", lambda a: (sum(a.mamba.in_proj_parts()), a.hidden_size)),
    (r"mixer\.conv1d\.weight", lambda a: (sum(a.mamba.conv_parts()), 1, a.mamba.conv_kernel)),
    (r"mixer\.conv1d\.bias", lambda a: (sum(a.mamba.conv_parts()),)),
    (r"mixer\.(?:A_log|D|dt_bias)", lambda a: (a.mamba.num_heads,)),
    (r"mixer\.norm\.weight", lambda a: (a.mamba.d_inner,)),
    (r"norm\.weight", lambda a: (a.hidden_size,)),  # a Mamba layer's own norm
    (r"mixer\.out_proj\.weight", lambda a: (a.hidden_size, a.mamba.d_inner)),
    (r"fc1_latent_proj\.weight", lambda a: (a.moe_latent_size, a.hidden_size)),
    (r"fc2_latent_proj\.weight", lambda a: (a.hidden_size, a.moe_latent_size)),
)

# megatron-core module name (end of the canonical key) -> full (un-parallel) shape; None: not known here.
_SHAPES: tuple[tuple[str, Callable[[ModelArch], tuple[int | None, ...]]], ...] = _MLA_SHAPES + _HYBRID_SHAPES + (
    (r"embedding\.word_embeddings\.weight|output_layer\.weight", lambda a: (a.vocab_size, a.hidden_size)),
    (r"embedding\.position_embeddings\.weight", lambda a: (a.max_position_embeddings, a.hidden_size)),
    (r"linear_qkv\.weight", lambda a: (_qkv_rows(a), a.hidden_size)),
    (r"linear_qkv\.bias", lambda a: (_qkv_rows(a),)),
    (r"linear_proj\.weight", lambda a: (a.hidden_size, _value_width(a))),
    (r"q_layernorm\.(?:weight|bias)", lambda a: (_q_norm_width(a),)),
    (r"k_layernorm\.(?:weight|bias)", lambda a: (a.kv_channels,)),
    (r"linear_proj\.bias|\w*(?:layernorm|_norm)\.(?:weight|bias)", lambda a: (a.hidden_size,)),
    (r"router\.weight", lambda a: (a.num_experts, a.hidden_size)),
    (r"router\.expert_bias", lambda a: (a.num_experts,)),
    (r"shared_experts\.linear_fc1\.weight", lambda a: (_shared_ffn(a, _glu(a)), a.hidden_size)),
    (r"shared_experts\.linear_fc2\.weight", lambda a: (a.hidden_size, _shared_ffn(a))),
    (r"shared_experts\.gate_weight", lambda a: (1, a.hidden_size)),
    (r"experts\..*linear_fc1\.weight", lambda a: (_glu(a) * _moe_ffn(a), _expert_width(a))),
    (r"experts\..*linear_fc2\.weight", lambda a: (_expert_width(a), _moe_ffn(a))),
    (r"linear_fc1\.weight", lambda a: (_glu(a) * a.ffn_hidden_size, a.hidden_size)),
    (r"linear_fc1\.bias", lambda a: (_glu(a) * a.ffn_hidden_size,)),
    (r"linear_fc2\.weight", lambda a: (a.hidden_size, a.ffn_hidden_size)),
    # a multi-token prediction layer's own
    (r"eh_proj\.weight", lambda a: (a.hidden_size, 2 * a.hidden_size)),
    (r"[eh]norm\.weight", lambda a: (a.hidden_size,)),
)
_SHAPE_RULES = [(re.compile(rf"(?:^|\.)(?:{pattern})$"), shape) for pattern, shape in _SHAPES]


def expected_shape(item: Item, arch: ModelArch) -> tuple[int | None, ...] | None:
    """The full Megatron-layout shape of ``item`` (experts stacked first); None for an unknown module, and for
    another tower's (a vision tower's norms and linear layers are named as the language model's, not sized so)."""
    if item.tower is not None:
        return None
    name = item.param.megatron.replace("{expert}", "0")
    for pattern, shape in _SHAPE_RULES:
        if pattern.search(name):
            return ((arch.num_experts,) if item.param.experts else ()) + shape(arch)
    return None


def _fits(shape: Iterable[int], expected: tuple[int | None, ...]) -> bool:
    shape = tuple(shape)
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _show(shape: Iterable[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Misfit(Exception):
    """A tensor that does not fit an architecture; ``item`` is where (None: the source as a whole)."""

    def __init__(self, message: str, item: Item | None = None) -> None:
        super().__init__(message)
        self.item = item


def _hf_misfit(source: Any, item: Item, arch: ModelArch, expected: tuple[int | None, ...]) -> str | None:
    """A Hugging Face source's stored tensors against what the family's ``to_hf`` makes of the expected shape."""
    names = source.family.hf_names(item.param, item.layer)
    stored = [tuple(source.reader.meta(name).shape) for name in names]
    if None in expected:
        return None
    try:
        wanted = [tuple(t.shape) for t in item.param.to_hf(torch.empty(expected, device="meta"), arch)]
    except RuntimeError:
        return None  # the full tensor is compared below
    for name, have, want in zip(names, stored, wanted):
        if have != want:
            return f"{name} is {_show(have)}, not {_show(want)}"
    return None


def _item_misfit(source: Any, tensors: Any, item: Item, arch: ModelArch) -> None:
    """Raise :class:`Misfit` when ``item``'s source tensors do not fit ``arch``."""
    expected = expected_shape(item, arch)
    try:
        problem = _hf_misfit(source, item, arch, expected) if source.kind == "hf" and expected else None
        if problem:
            raise Misfit(problem, item)
        full = tensors.full(item, meta=True)
    except BadInputError as error:
        raise Misfit(str(error), item)
    except (RuntimeError, ValueError, ZeroDivisionError) as error:  # a layout transform refusing the numbers
        where = f"layer {item.layer} " if item.layer is not None else ""
        raise Misfit(f"{where}'{item.param.megatron}' cannot be laid out ({reason(error, 120)})", item)
    if expected is not None and not _fits(full.shape, expected):
        where = f"layer {item.layer} " if item.layer is not None else ""
        raise Misfit(f"{where}'{item.param.megatron}' is {_show(full.shape)}, not {_show(expected)}", item)


def _has_item(family: Any, arch: ModelArch, item: Item) -> bool:
    """Whether the architecture has ``item`` (its layer, and the entry in that layer's kind)."""
    if item.group == MTP:
        index = item.layer - arch.num_layers
        return 0 <= index < arch.mtp_num_layers and item.param in mtp_layer_params(family, arch, index)
    if item.layer is not None and item.layer >= arch.num_layers:
        return False
    return item.param in family.params_for(item.group, arch, item.layer)


def first_misfit(source: Any, arch: ModelArch, first: Item | None = None) -> Misfit | None:
    """The first place the source's tensors do not fit ``arch`` (``first`` is tried before the walk)."""
    try:
        tensors = type(source.tensors)(source.reader, source.family, arch)
        tensors.left_out = source.tensors.left_out
        if first is not None and _has_item(source.family, arch, first):
            _item_misfit(source, tensors, first, arch)
        for item in walk(source.family, arch):
            _item_misfit(source, tensors, item, arch)
        left = tensors.unconsumed()
    except Misfit as misfit:
        return misfit
    except (BadInputError, RuntimeError, ValueError, ZeroDivisionError) as error:
        return Misfit(str(error))
    return Misfit(f"{left[0]} is a tensor this architecture has no place for") if left else None


def check_against_tensors(source: Any, reread: Callable[[dict[str, Any]], ModelArch], values: dict[str, Any],
                          file: Any) -> None:
    """Refuse an architecture the source's tensors do not fit, naming the file's field and both values.

    ``reread`` reads an architecture from changed ``values`` (config.json's object, the args' fields)
    as the source was read; it is only used to find the wrong field once a misfit is found.
    """
    misfit = first_misfit(source, source.arch)
    if misfit is None:
        return
    fix = _single_field_fix(source, reread, values, misfit)
    if fix:
        key, value = fix
        raise BadInputError(f"{key} is {values[key]!r}, but the tensors fit {key}={value} ({misfit})", file)
    if misfit.item is not None:  # else tensors no rule reads, which planning names as such
        raise BadInputError(f"the architecture it describes does not fit the tensors: {misfit}", file)


def _shape_numbers(arch: ModelArch) -> tuple:
    """The sizes, and which layers have experts (which decides the tensors each layer holds)."""
    return (*(getattr(arch, field) for field in SIZES + MOE_SIZES), arch.moe_layers)


def _reread_or_none(reread: Callable[[dict[str, Any]], ModelArch], values: dict[str, Any],
                    family: Any) -> ModelArch | None:
    try:
        arch = reread(values)
    except Exception:  # a changed value a reader refuses is simply not the fix
        return None
    return None if arch_problem(arch, has_experts(family, arch)) else arch


def _single_field_fix(source: Any, reread: Callable[[dict[str, Any]], ModelArch], values: dict[str, Any],
                      misfit: Misfit) -> tuple[str, int] | None:
    """The one numeric field whose change to a number the tensors show makes every tensor fit, if any."""
    base = _shape_numbers(source.arch)
    candidates = _candidates(source)
    budget = _MAX_REREADS
    for key, value in values.items():
        if not _whole(value) or not _changes_shape(reread, values, key, value, base):
            continue
        for candidate in candidates:
            budget -= 1
            if budget < 0:
                return None
            arch = _reread_or_none(reread, {**values, key: candidate}, source.family) if candidate != value else None
            if arch is not None and _shape_numbers(arch) != base and first_misfit(source, arch, misfit.item) is None:
                return key, candidate
    return None


def _changes_shape(reread: Callable[[dict[str, Any]], ModelArch], values: dict[str, Any], key: str, value: int,
                   base: tuple) -> bool:
    """Whether the architecture's sizes depend on ``key`` at all (most fields of Megatron args do not)."""
    for probe in (value + 1, 2 * value + 2):
        try:
            if _shape_numbers(reread({**values, key: probe})) != base:
                return True
        except Exception:  # a reader refusing the probe shows the field matters to it
            return True
    return False


def _candidates(source: Any) -> list[int]:
    """Numbers the tensors show (counts, dimensions, and what divides them), most telling first."""
    shown = _numbers_shown(source)
    divisors = set()
    for number in shown:
        divisors |= _divisors(number)
    return sorted(shown, reverse=True) + sorted(divisors - set(shown), reverse=True)


def _divisors(number: int) -> set[int]:
    if number > 10**8:  # too many to try; the number itself is a candidate
        return {number}
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return set(small) | {number // d for d in small}


def _numbers_shown(source: Any) -> set[int]:
    """Layer and expert counts, and every dimension of every stored tensor (times TP for Megatron shards)."""
    reader, shown = source.reader, set()
    if source.kind == "hf":
        prefix = re.escape(source.family.hf_layer_prefix.split("{layer}")[0]) + r"(\d+)\."
        shown.add(len({m.group(1) for name in reader.names() if (m := re.match(prefix, name))}))
        for name in reader.names():
            shown.update(reader.meta(name).shape)
        return {n for n in shown if n > 0}
    try:
        shown.add(sum(reader.stage_layer_counts()))
    except BadInputError:
        pass
    for rank in reader.files:
        experts = set()
        for layer, name in reader.all_weight_names(rank):
            if match := schema.SEQUENTIAL_EXPERT.match(name):
                experts.add(match.group(1))
            shown.update(d * m for d in reader.tensor(rank, name, layer, meta=True).shape for m in (1, reader.tp))
        shown.add(len(experts) * reader.ep)
    return {n for n in shown if n > 0}
