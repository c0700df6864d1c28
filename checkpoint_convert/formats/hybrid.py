"""Hybrid models (megatron-core's ``MambaModel``): a pattern of layer kinds and the Mamba-2 mixer sizes, in
Megatron-LM's args, and the layouts megatron-core can build them in.

megatron-core builds a hybrid model's layers from a pattern, one symbol per layer (``ModelArch.layer_pattern``,
``arch.LAYER_KINDS``): ``M`` a Mamba-2 mixer, ``*`` attention, ``-`` a dense MLP, ``E`` experts, each behind its own
norm. Megatron-LM up to 0.17 records it as ``hybrid_override_pattern``; 0.18 (``HybridModel``) as
``hybrid_layer_pattern``, which may also mark pipeline stage boundaries (``|``) and, after ``/``, the multi-token
prediction layers. The mixer sizes are ``mamba_state_dim``, ``mamba_head_dim``, ``mamba_num_groups`` and
``mamba_num_heads`` (None: hidden x 2 / head_dim); the convolution is 4 wide (``MambaMixer``'s ``d_conv``, no
argument). megatron-core 0.16.1's ``MambaStack`` splits pipeline stages evenly or by first/last stage counts and has
no virtual pipeline.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

from ..base.errors import BadInputError
from ..model.arch import LAYER_KINDS, MambaSizes, ModelArch

PIPE, MTP_SEPARATOR = "|", "/"
MAMBA_CONV_KERNEL = 4  # MambaMixer's d_conv: megatron-core passes no other
MAMBA_NORM_EPSILON = 1e-5  # MambaMixer's gated norm: megatron-core fixes its epsilon


def check_pattern(pattern: Any, num_layers: int, source: Any) -> str:
    """A layer pattern of ``num_layers`` known symbols, or bad input naming it."""
    if not isinstance(pattern, str) or len(pattern) != num_layers or not set(pattern) <= set(LAYER_KINDS):
        raise BadInputError(f"the hybrid layer pattern {pattern!r} is not {num_layers} of the symbols "
                            f"{''.join(LAYER_KINDS)} (Mamba, attention, MLP, experts)", source)
    return pattern


def _get(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def pattern_from_args(args: Any, num_layers: int, source: Any) -> str | None:
    """The layer pattern of Megatron-LM's args (0.18's ``hybrid_layer_pattern`` without its stage marks and
    multi-token prediction part, else ``hybrid_override_pattern``); None for a model that is not hybrid. A
    hybrid model given by attention and MLP ratios alone is refused: its pattern is megatron-core's to work out."""
    layered = _get(args, "hybrid_layer_pattern")
    if isinstance(layered, str):
        main, _, mtp = layered.partition(MTP_SEPARATOR)
        if mtp:
            raise BadInputError(f"hybrid_layer_pattern {layered!r} has multi-token prediction layers, which are not "
                                "converted", source)
        return check_pattern(main.replace(PIPE, ""), num_layers, source)
    pattern = _get(args, "hybrid_override_pattern")
    if pattern is not None:
        return check_pattern(pattern, num_layers, source)
    if not _get(args, "is_hybrid_model", False):
        return None
    ratios = {name: _get(args, name, 0.0) for name in ("hybrid_attention_ratio", "hybrid_mlp_ratio")}
    if any(ratios.values()):
        raise BadInputError(f"a hybrid model given by {ratios} without hybrid_override_pattern: record the layer "
                            "pattern megatron-core allocated", source)
    return "M" * num_layers


def hybrid_fields(args: Any, num_layers: int, hidden_size: int, source: Any) -> dict[str, Any]:
    """``ModelArch`` fields of a hybrid model's args: its pattern and Mamba sizes (megatron-core's defaults where
    the args leave them out); none for another model."""
    pattern = pattern_from_args(args, num_layers, source)
    if pattern is None:
        return {}
    sizes = {}
    for name, default in (("mamba_state_dim", 128), ("mamba_head_dim", 64), ("mamba_num_groups", 8)):
        sizes[name] = _whole(_get(args, name, default), name, source)
    heads = _get(args, "mamba_num_heads")
    heads = hidden_size * 2 // sizes["mamba_head_dim"] if heads is None else _whole(heads, "mamba_num_heads", source)
    if heads % sizes["mamba_num_groups"]:
        raise BadInputError(f"mamba_num_groups {sizes['mamba_num_groups']} does not divide the {heads} Mamba heads",
                            source)
    mamba = MambaSizes(state_dim=sizes["mamba_state_dim"], head_dim=sizes["mamba_head_dim"],
                       num_groups=sizes["mamba_num_groups"], num_heads=heads, conv_kernel=MAMBA_CONV_KERNEL)
    return {"layer_pattern": pattern, "mamba": mamba}


def _whole(value: Any, name: str, source: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(f"{name} is {value!r}, not a whole number of at least 1", source)
    return value


def hybrid_args(arch: ModelArch) -> dict[str, Any]:
    """Megatron-LM's fields of a hybrid model: ``is_hybrid_model``, the pattern as 0.16-0.17 read it
    (``hybrid_override_pattern``, no ratios) and the Mamba sizes; none for another model. 0.18's
    ``hybrid_layer_pattern`` is not written beside it: Megatron-Bridge's providers refuse both at once and take
    the older field alone, with a deprecation warning (``MambaModelProvider.finalize``)."""
    if arch.layer_pattern is None:
        return {}
    mamba = arch.mamba
    return dict(is_hybrid_model=True, hybrid_override_pattern=arch.layer_pattern, hybrid_attention_ratio=0.0,
                hybrid_mlp_ratio=0.0, mamba_state_dim=mamba.state_dim, mamba_head_dim=mamba.head_dim,
                mamba_num_groups=mamba.num_groups, mamba_num_heads=mamba.num_heads,
                moe_latent_size=arch.moe_latent_size)


def require_hybrid_layout(arch: ModelArch, stages: Sequence[int], vpp: int, tp: int) -> None:
    """Refuse Megatron output megatron-core cannot build a hybrid model from: a virtual pipeline, stages other
    than even ones or first/last counts with even middles (``MambaStack._select_layers_for_pipeline_parallel``),
    a convolution other than 4 wide, Mamba heads or groups the tensor-parallel size does not divide
    (``MambaMixer``)."""
    if arch.layer_pattern is None:
        return
    if vpp > 1:
        raise BadInputError("megatron-core's hybrid (Mamba) model has no virtual pipeline")
    middle = list(stages[1:-1])
    if len(set(middle)) > 1 or min(stages) < 1:
        raise BadInputError(f"pipeline stages {list(stages)}: megatron-core's hybrid (Mamba) model splits even stages "
                            "or given first and last stages with even ones between, none empty")
    mamba = arch.mamba
    if mamba is not None and mamba.conv_kernel != MAMBA_CONV_KERNEL:
        raise BadInputError(f"the Mamba convolution is {mamba.conv_kernel} wide; megatron-core's is "
                            f"{MAMBA_CONV_KERNEL} (MambaMixer's d_conv)")
    if mamba is not None and (mamba.num_heads % tp or mamba.num_groups % tp):
        raise BadInputError(f"tensor parallel size {tp} does not divide the {mamba.num_heads} Mamba heads and "
                            f"{mamba.num_groups} groups")


# ---- Megatron-Bridge's hybrid providers (run_config.yaml) -----------------------------------------

_BRIDGE_HYBRID = "megatron.bridge.models.hybrid.hybrid_provider."
# GPTModelProvider fields a hybrid provider (HybridModelProvider, MambaModelProvider) does not have: its layers come
# from hybrid_stack_spec, and it has no rope scaling of its own
GPT_ONLY_FIELDS = ("transformer_layer_spec", "rope_scaling", "rope_scaling_factor", "yarn_rotary_scaling_factor",
                   "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale",
                   "yarn_mscale_all_dim", "yarn_correction_range_round_to_int")
MAMBA_SIZE_FIELDS = ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads")
# the stack specs that build local (torch) norms; both save Transformer Engine's norm names (remap_te_layernorm)
_LOCAL_STACK_SPECS = ("modelopt_hybrid_stack_spec", "modelopt_mamba_stack_spec")


def hybrid_provider_fields(fields: dict[str, Any], args: Any) -> dict[str, Any]:
    """A hybrid model's provider fields, as Megatron-Bridge 0.6's ``HybridModelProvider`` takes them: the GPT
    provider's ``fields`` without the ones it lacks, the pattern as ``hybrid_layer_pattern`` alone (its ``finalize``
    refuses both spellings at once and turns the older one into this one), the Mamba sizes and the stack spec as
    the named function Megatron-Bridge writes (Transformer Engine's, or ModelOpt's with torch norms)."""
    if not _get(args, "is_hybrid_model", False):
        return fields
    local = args.transformer_impl == "local"
    spec = _BRIDGE_HYBRID + ("modelopt_hybrid_stack_spec" if local else "transformer_engine_hybrid_stack_spec")
    hybrid = {name: value for name, value in fields.items() if name not in GPT_ONLY_FIELDS}
    hybrid.update({name: getattr(args, name) for name in MAMBA_SIZE_FIELDS}, is_hybrid_model=True,
                  hybrid_layer_pattern=args.hybrid_override_pattern, moe_latent_size=_get(args, "moe_latent_size"),
                  hybrid_stack_spec={"_call_": False, "_target_": spec})
    return hybrid


def hybrid_args_of_provider(model: dict[str, Any], source: Any) -> dict[str, Any]:
    """Megatron-LM's hybrid args of a provider's ``model:`` mapping (none for a GPT provider): the pattern of
    ``hybrid_layer_pattern`` (stage marks dropped) or ``hybrid_override_pattern``, never both, and the Mamba sizes."""
    layered, override = model.get("hybrid_layer_pattern"), model.get("hybrid_override_pattern")
    if layered is None and override is None:
        return {}
    if layered is not None and override is not None:
        raise BadInputError("model.hybrid_layer_pattern and model.hybrid_override_pattern are both set, which "
                            "Megatron-Bridge's hybrid provider refuses", source)
    spelled = {"hybrid_layer_pattern": layered, "hybrid_override_pattern": override}
    pattern = pattern_from_args(SimpleNamespace(**spelled), model.get("num_layers"), source)
    return dict(is_hybrid_model=True, hybrid_override_pattern=pattern, hybrid_attention_ratio=0.0,
                hybrid_mlp_ratio=0.0, moe_latent_size=model.get("moe_latent_size"),
                **{name: model[name] for name in MAMBA_SIZE_FIELDS if model.get(name) is not None})


def local_stack_spec(model: dict[str, Any]) -> bool:
    """Whether a hybrid provider's stack spec builds torch norms (ModelOpt's spec)."""
    spec = model.get("hybrid_stack_spec") or model.get("mamba_stack_spec")
    target = spec.get("_target_") if isinstance(spec, dict) else spec
    return str(target or "").endswith(_LOCAL_STACK_SPECS)
