"""DeepSeekMoE: the expert layers of DeepSeek-V3 and V2, and their routers in megatron-core's terms.

Layers from ``first_k_dense_replace`` on route to experts (megatron-core's ``moe_layer_freq`` list), the others
keep a dense MLP of ``intermediate_size``. An expert layer holds:

| Hugging Face (``mlp.``) | megatron-core (``mlp.``) |
| --- | --- |
| ``gate.weight`` [experts, hidden] | ``router.weight`` |
| ``gate.e_score_correction_bias`` [experts] (V3, float32) | ``router.expert_bias`` (``moe_router_enable_expert_bias``) |
| ``experts.gate_up_proj`` / ``down_proj`` (3-D; older: ``experts.E.{gate,up,down}_proj``) | ``experts.local_experts.E.linear_fc1`` / ``linear_fc2`` |
| ``shared_experts.{gate,up,down}_proj`` (``n_shared_experts`` x ``moe_intermediate_size``) | ``shared_experts.linear_fc1`` / ``linear_fc2`` |

V3's router (transformers' ``DeepseekV3TopkRouter``) takes sigmoid scores, adds the bias for choosing only,
keeps the ``topk_group`` of ``n_group`` groups whose two best biased scores sum highest, takes the top-k there,
renormalises with ``norm_topk_prob`` and multiplies by ``routed_scaling_factor``: megatron-core's sigmoid router
with expert bias, ``moe_router_num_groups`` / ``moe_router_group_topk`` (which ranks groups by their best
k / group_topk scores, so k / topk_group must be 2) and ``moe_router_topk_scaling_factor``; it always
renormalises more than one expert, so ``norm_topk_prob`` must be true exactly when k > 1. V2's router
(``DeepseekV2TopkRouter``) takes a softmax over every expert (``moe_router_pre_softmax``), never renormalises,
scales, and with ``topk_method: group_limited_greedy`` ranks groups by their best score (k / topk_group 1).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from checkpoint_convert.model import BadInputError, Layers, ModelArch, Param, Style
from mixtral.family import EXPERTS, ROUTER
from qwen2_moe.family import shared_expert


def _routed(arch: ModelArch) -> bool:
    return bool(arch.num_experts)


def _expert_bias(arch: ModelArch) -> bool:
    return arch.moe_router_enable_expert_bias


def _sigmoid_without_bias(arch: ModelArch) -> bool:
    """A Megatron sigmoid router without expert bias is V3's with a bias of zero."""
    return _routed(arch) and arch.moe_router_score_function == "sigmoid" and not arch.moe_router_enable_expert_bias


def _expert_count(arch: ModelArch) -> tuple[int, ...]:
    return (arch.num_experts,)


EXPERT_BIAS = (
    Param("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), Style.REPLICATED, when=_expert_bias,
          layers=Layers.MOE, float32=True),
    Param("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), Style.REPLICATED,
          when=_sigmoid_without_bias, layers=Layers.MOE, zero_in_megatron=_expert_count, float32=True),
)
# a DeepSeek config may describe a dense model (the core then wants no expert tensors in its table)
MOE_LAYER = tuple(dataclasses.replace(param, when=_routed) for param in ROUTER + EXPERTS) + EXPERT_BIAS + shared_expert(
    "mlp.shared_experts.")
# the config keys a round trip writes as the source spelled them, when they still describe the model
MOE_KEYS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
            "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def _whole(cfg: Any, key: str, minimum: int) -> int:
    value = getattr(cfg, key, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInputError(f"{key} is {value!r}, not a whole number of at least {minimum}")
    return value


def _groups(cfg: Any, per_group: int, router: str) -> dict[str, Any]:
    """Group-limited routing: none when every group may be chosen; else the router must rank groups by the sum of
    their best ``per_group`` scores, as megatron-core does by their best k // topk_group."""
    experts, topk = cfg.n_routed_experts, cfg.num_experts_per_tok
    groups, chosen = cfg.n_group or 1, cfg.topk_group or 1
    if experts % groups:
        raise BadInputError(f"n_group {groups} does not divide n_routed_experts {experts}")
    if chosen >= groups:
        return {"moe_router_num_groups": None, "moe_router_group_topk": None}
    if topk // chosen != per_group or topk > chosen * (experts // groups):
        raise BadInputError(f"num_experts_per_tok {topk} with topk_group {chosen}: {router} ranks groups by their best "
                            f"{per_group} score{'s' if per_group > 1 else ''}, megatron-core by their best "
                            f"num_experts_per_tok // topk_group = {topk // chosen}")
    return {"moe_router_num_groups": groups, "moe_router_group_topk": chosen}


def _v3_routing(cfg: Any) -> dict[str, Any]:
    topk = cfg.num_experts_per_tok
    if bool(cfg.norm_topk_prob) != (topk > 1):
        raise BadInputError(f"norm_topk_prob is {cfg.norm_topk_prob} with num_experts_per_tok {topk}: megatron-core's "
                            "sigmoid router renormalises the weights exactly when it chooses more than one expert")
    return dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_pre_softmax=False,
                **_groups(cfg, 2, "transformers' DeepseekV3 router"))


def _v2_routing(cfg: Any) -> dict[str, Any]:
    method = getattr(cfg, "topk_method", None)
    if method not in V2_TOPK_METHODS:
        raise BadInputError(f"topk_method is {method!r}, not one transformers' DeepseekV2 router computes "
                            f"({', '.join(V2_TOPK_METHODS)})")
    if cfg.norm_topk_prob:
        raise BadInputError("norm_topk_prob is true, but transformers' DeepseekV2 router never renormalises its top-k "
                            "weights (DeepSeek's own code does): which one the model means is unclear")
    groups = (_groups(cfg, 1, "transformers' DeepseekV2 router") if method == "group_limited_greedy"
              else {"moe_router_num_groups": None, "moe_router_group_topk": None})
    return dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False, moe_router_pre_softmax=True,
                **groups)


def moe_fields(cfg: Any, v2: bool) -> dict[str, Any]:
    """The ``ModelArch`` fields of a DeepSeek config's expert layers; none for a dense model (no routed experts, or
    ``first_k_dense_replace`` covering every layer)."""
    layers, experts = cfg.num_hidden_layers, getattr(cfg, "n_routed_experts", None)
    dense = _whole(cfg, "first_k_dense_replace", 0) if getattr(cfg, "first_k_dense_replace", None) is not None else 0
    if not experts or dense >= layers:
        return {}
    if getattr(cfg, "moe_layer_freq", 1) != 1:  # DeepSeek's own code's key; transformers has experts in every layer
        raise BadInputError(f"moe_layer_freq is {cfg.moe_layer_freq!r}: transformers' DeepSeek models have experts in "
                            "every layer from first_k_dense_replace on (moe_layer_freq 1)")
    ffn, topk = _whole(cfg, "moe_intermediate_size", 1), _whole(cfg, "num_experts_per_tok", 1)
    scaling = getattr(cfg, "routed_scaling_factor", None)
    return dict(num_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=ffn,
                moe_layers=(0,) * dense + (1,) * (layers - dense) if dense else None,
                moe_shared_expert_intermediate_size=_whole(cfg, "n_shared_experts", 1) * ffn,
                moe_router_topk_scaling_factor=1.0 if scaling is None else float(scaling),
                **(_v2_routing(cfg) if v2 else _v3_routing(cfg)))


ROUTER_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layers",
                 "moe_shared_expert_intermediate_size", "moe_router_topk_scaling_factor", "moe_router_score_function",
                 "moe_router_num_groups", "moe_router_group_topk")


def _routing_of(fields: dict[str, Any]) -> tuple:
    """What decides the expert layers' output: a sigmoid router ignores ``moe_router_pre_softmax``, a missing
    expert bias is a zero one, no scaling is a factor of 1."""
    values = {key: fields.get(key) for key in ROUTER_FIELDS}
    values["moe_router_topk_scaling_factor"] = values["moe_router_topk_scaling_factor"] or 1.0
    softmax_order = fields.get("moe_router_pre_softmax") if values["moe_router_score_function"] == "softmax" else None
    return tuple(values.values()) + (softmax_order,)


def _first_dense(arch: ModelArch) -> int:
    pattern = arch.moe_layers or (1,) * arch.num_layers
    dense = pattern.index(1)
    if pattern != (0,) * dense + (1,) * (arch.num_layers - dense):
        raise BadInputError(f"expert layers {list(pattern)}: a DeepSeek model has its dense layers first, then experts "
                            "in every layer (first_k_dense_replace)")
    return dense


def _canonical_kwargs(arch: ModelArch, v2: bool) -> dict[str, Any]:
    """The config keys of the architecture's expert layers, spelled plainly."""
    ffn, shared = arch.moe_ffn_hidden_size or arch.ffn_hidden_size, arch.moe_shared_expert_intermediate_size
    if shared is None or shared % ffn or arch.moe_shared_expert_gate:
        raise BadInputError(f"a DeepSeek model has ungated shared experts of a multiple of the expert ffn size {ffn}; "
                            f"this one has {'gated ' if arch.moe_shared_expert_gate else ''}shared experts of {shared}")
    kwargs = dict(n_routed_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk,
                  moe_intermediate_size=ffn, n_shared_experts=shared // ffn, first_k_dense_replace=_first_dense(arch),
                  routed_scaling_factor=arch.moe_router_topk_scaling_factor or 1.0,
                  n_group=arch.moe_router_num_groups or 1, topk_group=arch.moe_router_group_topk or 1,
                  norm_topk_prob=not v2 and arch.moe_router_topk > 1)
    if v2:
        kwargs["topk_method"] = "group_limited_greedy" if arch.moe_router_group_topk else "greedy"
    return kwargs


def moe_config_kwargs(arch: ModelArch, v2: bool) -> dict[str, Any]:
    """Inverse of :func:`moe_fields`: the config keys, as the source recorded them when they still route the same
    way (``arch.extra``), else spelled plainly; refused when no DeepSeek router routes as the architecture's."""
    if not arch.num_experts:  # every layer dense (a Megatron-LM source records no first_k_dense_replace)
        return {"first_k_dense_replace": max(arch.extra.get("first_k_dense_replace") or 0, arch.num_layers)}
    canonical = _canonical_kwargs(arch, v2)
    recorded = {key: arch.extra[key] for key in canonical if arch.extra.get(key) is not None}
    wanted = _routing_of(vars(arch))
    for kwargs in ({**canonical, **recorded}, canonical):
        config = SimpleNamespace(num_hidden_layers=arch.num_layers, **kwargs)
        try:
            if _routing_of(moe_fields(config, v2)) == wanted:
                return kwargs
        except BadInputError:
            if kwargs is canonical:
                raise
    router = "softmax over every expert, not renormalised" if v2 else "sigmoid scores"
    raise BadInputError(f"the router ({arch.moe_router_score_function} scores, pre-softmax "
                        f"{arch.moe_router_pre_softmax}) is not a {arch.family} router ({router})")
