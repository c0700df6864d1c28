"""Declarative family tables and the registry the CLIs look families up in.

A family is a :class:`FamilySpec`: for each Megatron tensor (named in the mcore local-spec schema,
relative to its layer), the Hugging Face tensor(s) it corresponds to, its tensor-parallel style and
a pair of pure transforms between the two layouts. The core handles everything else: schemas,
parallel splits, pipeline stages, vocab padding, files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from ..base.errors import BadInputError
from .arch import ModelArch
from .parallel import Style, cat, stack

Tensors = Sequence[torch.Tensor]


def single_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """Default transform: the Megatron tensor is the Hugging Face tensor."""
    return [tensor]


def single_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    """Default transform: the Hugging Face tensor is the Megatron tensor."""
    return tensors[0]


def always(arch: ModelArch) -> bool:
    return True


class Layers(Enum):
    """Which layers hold a table entry: every layer, the layers that route to experts, those with a dense MLP,
    and in hybrid models those with attention or a Mamba mixer (``ModelArch.layer_parts``).

    A mixture-of-experts model may keep dense MLPs in some layers (``ModelArch.moe_layers``, megatron-core's
    ``moe_layer_freq`` list); a dense model's layers are all dense. A hybrid model's layers each hold one of
    a Mamba mixer, attention, a dense MLP or experts (``ModelArch.layer_pattern``); other models' layers all
    hold attention.
    """

    EVERY = "every"
    MOE = "moe"
    DENSE = "dense"
    ATTENTION = "attention"
    MAMBA = "mamba"

    def holds(self, arch: ModelArch, layer: int) -> bool:
        return self is Layers.EVERY or self.value in arch.layer_parts(layer)


@dataclass(frozen=True)
class Param:
    """One Megatron tensor and the Hugging Face tensor(s) it is made of.

    ``megatron``: mcore local-spec key, relative to ``decoder.layers.N.`` for layer params.
    ``hf``: Hugging Face names, relative to the family's layer prefix for layer params.
    ``to_hf`` / ``to_megatron``: pure transforms between the full (un-parallel) Megatron tensor and
    the Hugging Face tensors. ``when``: whether the architecture has this tensor at all; ``layers``: in
    which of its layers (dense MLP entries in dense layers, router and experts in expert layers).
    """

    megatron: str
    hf: tuple[str, ...]
    style: Style
    to_hf: Callable[[torch.Tensor, ModelArch], list[torch.Tensor]] = single_to_hf
    to_megatron: Callable[[Tensors, ModelArch], torch.Tensor] = single_to_megatron
    when: Callable[[ModelArch], bool] = always
    zero_in_megatron: Callable[[ModelArch], tuple[int, ...]] | None = None
    experts: bool = False
    layers: Layers = Layers.EVERY
    float32: bool = False
    shared: bool = False
    # ``unused`` (with ``zero_in_megatron``): the Hugging Face model holds the tensor but never runs it (LLaVA's CLIP
    # post-norm): left out going to Megatron whatever its values, zeros coming back.
    unused: bool = False

    # ``shared``: a multi-token prediction layer's Hugging Face copy of the main model's tensor ``megatron``
    # (its embedding or output layer, which megatron-core shares): written from it, checked equal to it on read.
    parts: Callable[[ModelArch], tuple[int, ...]] | None = None

    # ``parts`` (``Style.PARTS_COLUMN``): the row counts of the parts fused along dim 0, each split across
    # tensor-parallel ranks on its own (a Mamba mixer's in_proj [z, x, B, C, dt]).

    # ``float32``: written in float32 whatever the output dtype (a router's expert bias, which megatron-core and
    # transformers both keep in float32: rounded to bf16 it would choose other experts).

    # ``experts``: one tensor per MoE expert in Megatron (``{expert}`` in ``megatron`` is the index
    # local to the expert-parallel rank), stacked on a leading expert axis on the Hugging Face side
    # and in the full tensor the engine passes around; ``style`` applies to each expert's tensor.

    # ``zero_in_megatron``: the Hugging Face tensor has no Megatron counterpart because Megatron's
    # architecture fixes it at zero (e.g. an output-projection bias when only qkv is biased). It gives
    # the tensor's shape: Megatron sources produce zeros, Megatron targets check it is zero and store nothing.


GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"  # Megatron-Bridge's generic GPT provider


def no_provider_fields(value: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class BridgeProvider:
    """How Megatron-Bridge records one family's models: the ``model:`` provider of its run_config.yaml.

    ``writes``: the provider class (the ``_target_``) Megatron-Bridge writes for the family, written
    for it here. ``reads``: further provider classes read as this family (e.g. older Megatron-Bridge
    releases' per-model providers). A class that only one family lists names that family; one that
    several list (``GPT_PROVIDER``) leaves the family to the architecture, as Megatron-LM args do.
    ``fields``: provider fields only this family converts, with ``to_provider`` (architecture ->
    those fields) and ``from_provider`` (the ``model:`` mapping -> ``ModelArch.extra`` entries); the
    core refuses them elsewhere. ``from_provider`` runs when the class names this family.
    """

    writes: str
    reads: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    to_provider: Callable[[ModelArch], dict[str, Any]] = no_provider_fields
    from_provider: Callable[[dict[str, Any]], dict[str, Any]] = no_provider_fields

    @property
    def classes(self) -> tuple[str, ...]:
        return (self.writes, *self.reads)


def no_layers(arch: ModelArch) -> int:
    return 0


@dataclass(frozen=True)
class Tower:
    """One tower other than the language model (a vision encoder, a merger).

    Multi-tower models: a vision encoder, a merger / projector and a language model, each its own key table.

    A text model is one tower, the language model: its family's table (``FamilySpec.first_stage``, ``layer``,
    ``last_stage``), its layers in the core's Megatron schemas (``decoder.layers.N``), its names under
    ``FamilySpec.megatron_prefix`` in the Megatron layout (empty for Megatron-LM GPT models; Megatron-Bridge's
    vision-language models keep it under ``language_model.``). Every other tower is a :class:`Tower`: tables of
    the same :class:`~checkpoint_convert.family.Param` entries, its own layer count (read from the architecture),
    and the prefixes that place its names on each side. The walk (``engine.walk``) visits the other towers first,
    in the order the model runs them, then the language model; targets and sources ask :func:`hf_names` and
    :func:`megatron_name` where the names go. The core never names a tower's family.

    ``first`` / ``layer`` / ``last``: its entries before, in each of and after its ``num_layers(arch)`` layers;
    ``Param.hf`` is relative to ``hf_prefix`` (``hf_prefix + hf_layer_prefix`` in a layer), ``Param.megatron``
    to ``megatron_prefix`` (``megatron_prefix + megatron_layer_prefix`` in a layer). Its tensors are stored
    whole, one key each (Megatron-Bridge keeps the vision tower as Hugging Face's module: replicated, one key
    per layer's tensor), on the first pipeline stage.
    """

    name: str
    hf_prefix: str
    megatron_prefix: str
    first: tuple[Param, ...] = ()
    layer: tuple[Param, ...] = ()
    last: tuple[Param, ...] = ()
    num_layers: Callable[[ModelArch], int] = no_layers
    hf_layer_prefix: str = ""  # format string with {layer}
    megatron_layer_prefix: str = ""  # format string with {layer}
    # its layers' norms fused into the next linear layer's names under Transformer Engine (megatron-core's TE spec);
    # False: norm modules of their own in either spec (Megatron-LM's InternViT layer spec)
    te_fused_norms: bool = True

    def params_for(self, group: str, arch: ModelArch) -> list[Param]:
        table = {"first": self.first, "layer": self.layer, "last": self.last}[group]
        return [param for param in table if param.when(arch)]

    def hf_names(self, param: Param, layer: int | None) -> list[str]:
        prefix = self.hf_prefix + (self.hf_layer_prefix.format(layer=layer) if layer is not None else "")
        return [prefix + name for name in param.hf]

    def megatron_name(self, param: Param, layer: int | None) -> str:
        prefix = self.megatron_prefix + (self.megatron_layer_prefix.format(layer=layer) if layer is not None else "")
        return prefix + param.megatron


@dataclass(frozen=True)
class FamilySpec:
    """Everything the core needs to know about one model family."""

    name: str
    hf_model_types: tuple[str, ...]
    hf_layer_prefix: str  # format string with {layer}
    first_stage: tuple[Param, ...]  # embeddings: global names
    layer: tuple[Param, ...]
    last_stage: tuple[Param, ...]  # final norm, output layer: global names
    hf_config_class: str  # the transformers config class, e.g. "LlamaConfig"
    # reads an instance of that class; the core may first pass config.json's values as plain
    # attributes (see sources.open_checkpoint), so a key config.json lacks raises AttributeError
    arch_from_hf_config: Callable[[Any], ModelArch]
    hf_config_from_arch: Callable[[ModelArch], Any]
    matches_megatron: Callable[[ModelArch], bool]
    hf_ignored_suffixes: tuple[str, ...] = field(default=())  # HF buffers that are not weights
    # Older Hugging Face layouts: given the stored names, {current name: (stored names, combine)}.
    hf_aliases: Callable[[list[str]], dict[str, tuple[list[str], Callable]]] | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # Megatron-Bridge's provider for this family; None: Megatron-Bridge output is refused for it
    bridge: BridgeProvider | None = None
    # Hugging Face tensors of multi-token prediction layers: a conversion leaves them out with --drop_mtp_layers,
    # converts them when the family has ``mtp_head`` and refuses the source otherwise
    hf_mtp_tensor: Callable[[ModelArch, str], bool] | None = None
    # Multi-token prediction layers (see ``checkpoint_convert/engine/mtp.py``): the entries of an MTP layer beside its
    # transformer layer, Megatron names relative to ``mtp.layers.i.`` (``shared`` ones global), Hugging Face names
    # relative to the layer prefix of layer ``num_layers + i``; empty: the family converts no MTP layers
    mtp_head: tuple[Param, ...] = ()
    # ---- multi-tower models (``Tower``): the table above is the language model's
    # the other towers (vision encoder, merger), in the order the model runs them
    towers: tuple[Tower, ...] = ()
    # the language model's prefix in Megatron names (Megatron-Bridge's vision-language models: "language_model.")
    megatron_prefix: str = ""
    # the fixed inputs ``verify --logits`` feeds the Hugging Face model (a vision-language family: an image and text);
    # None: fixed token ids
    logits_inputs: Callable[[ModelArch], dict[str, torch.Tensor]] | None = None
    # ---- MindSpeed-MM's layout of a multi-tower model (``checkpoint_convert/formats/mindspeed_mm.py``); None: refused
    mindspeed_mm: "TowerLayout | None" = None
    # why ``bridge`` is None when the user should hear it (said in the refusal of Megatron-Bridge output)
    bridge_missing: str = ""
    # ---- megatron-core's multimodal model (``LLaVAModel``: ``vision_model.``, ``vision_projection.``,
    # ``language_model.``) in Megatron-LM rank files (``checkpoint_convert/engine/mcore_vlm.py``); None: refused
    mcore_vlm: "TowerLayout | None" = None
    # Hugging Face tensors the model never runs (vision layers after the feature layer): left out of every output
    hf_unused: Callable[[ModelArch, str], bool] | None = None

    def params_for(self, group: str, arch: ModelArch, layer: int | None = None) -> list[Param]:
        """The entries of ``group`` the architecture has: with ``layer``, those of that layer (its kind,
        dense or expert); without, every entry some layer may hold."""
        table = {"first": self.first_stage, "layer": self.layer, "last": self.last_stage}[group]
        return [param for param in table if param.when(arch) and (layer is None or param.layers.holds(arch, layer))]

    def hf_names(self, param: Param, layer: int | None) -> list[str]:
        prefix = self.hf_layer_prefix.format(layer=layer) if layer is not None else ""
        return [prefix + name for name in param.hf]


@dataclass(frozen=True)
class TowerLayout:
    """A trainer's own names for a multi-tower model: its towers' tables and the language model's prefix.

    MindSpeed-MM keeps the vision tower in megatron-core form (fused qkv per head, fused gate/up) under
    ``image_encoder.`` and the language model under ``text_decoder.``; Megatron-Bridge keeps the vision tower as
    Hugging Face stores it. Both tables name the same Hugging Face tensors, so a model is read in one layout and
    written in the other through them (:func:`in_layout`).
    """

    towers: tuple[Tower, ...]
    megatron_prefix: str
    # the towers' sizes the layout splits over tensor-parallel ranks, as (what, size): TP must divide each
    tp_splits: Callable[[ModelArch], tuple[tuple[str, int], ...]] | None = None
    # the word embeddings and output layer split in unequal row blocks when TP does not divide the vocabulary (the
    # first vocab % TP ranks one row more: MindSpeed-MM's UnalignedEmbeddingSplit); False: TP must divide it
    uneven_vocab: bool = False
    # the Megatron-LM args the layout's trainer reads beyond the language model's (megatron-core's LLaVA: vision model
    # type, image size, ...) at a tensor-parallel size; raises BadInputError for a model the layout cannot express
    megatron_args: Callable[[ModelArch, int], dict[str, Any]] | None = None


def in_layout(family: FamilySpec, layout: TowerLayout) -> FamilySpec:
    """The family as the layout names it: the layout's towers and language-model prefix, the rest unchanged."""
    return replace(family, towers=layout.towers, megatron_prefix=layout.megatron_prefix)


def layout_flags(family: FamilySpec) -> str:
    """The flags that write the Megatron layouts a multi-tower family has, for a refusal's advice."""
    flags = [flag for flag, table in (("--megatron_bridge", family.bridge),
                                      ("--megatron_format mindspeed_mm", family.mindspeed_mm),
                                      ("--megatron_format mcore", family.mcore_vlm)) if table is not None]
    return " or ".join(flags) or "none of them here"


_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, FamilySpec]:
    return dict(_REGISTRY)


def family_named(name: str) -> FamilySpec:
    if name not in _REGISTRY:
        raise BadInputError(f"unknown model family '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def family_for_hf_model_type(model_type: str | None, source: str) -> FamilySpec:
    for spec in _REGISTRY.values():
        if model_type in spec.hf_model_types:
            return spec
    raise BadInputError(f"config.json has model_type '{model_type}', which no family handles", source)


def family_for_megatron(arch: ModelArch, source: str) -> FamilySpec:
    """The most specific registered family whose predicate accepts the Megatron architecture."""
    for spec in _REGISTRY.values():
        if spec.matches_megatron(arch):
            return spec
    raise BadInputError(
        f"no family matches these args (normalization={arch.normalization}, activation={arch.activation}, "
        f"position embedding={arch.position_embedding_type}, experts={arch.num_experts}); pass --model", source)


# ---- transforms several families share ---------------------------------------------------------

def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Megatron's fused QKV rows: for each query group, its query heads, then its key, then its value.

    With one group per head (multi-head attention) this is legacy GPT's (heads, 3, head_dim) order.
    Works for weights ([rows, hidden]) and biases ([rows]).
    """
    groups, dim = arch.num_query_groups, arch.kv_channels
    tail = q.shape[1:]
    q = q.reshape(groups, arch.heads_per_group * dim, *tail)
    k = k.reshape(groups, dim, *tail)
    v = v.reshape(groups, dim, *tail)
    return cat([q, k, v], dim=1).reshape(-1, *tail)


def unpack_qkv(qkv: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """Inverse of :func:`pack_qkv`: full q, k and v projections."""
    groups, dim = arch.num_query_groups, arch.kv_channels
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, (arch.heads_per_group + 2) * dim, *tail)
    q, k, v = torch.split(per_group, [arch.heads_per_group * dim, dim, dim], dim=1)
    return [part.reshape(-1, *tail) for part in (q, k, v)]


def qkv_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    """Separate q, k and v projections (weights or biases) -> Megatron's fused ``linear_qkv``."""
    return pack_qkv(*tensors, arch)


def qkv_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return unpack_qkv(tensor, arch)


def gate_up_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    """SwiGLU gate and up projections -> Megatron's ``linear_fc1`` rows [gate; up]."""
    return cat(tensors, dim=0)


def gate_up_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return list(torch.chunk(tensor, 2, dim=0))


# ---- Hugging Face config conventions several families share ----------------------------------

SLIDING, FULL = "sliding_attention", "full_attention"


def window_from_hf_config(cfg: Any, num_layers: int) -> dict[str, Any]:
    """``window_size``/``window_layers`` of a transformers config's sliding-window fields.

    ``sliding_window`` alone slides every layer (Mistral); ``use_sliding_window: false`` turns it off
    (Qwen); ``layer_types`` lists each layer's kind, and older configs without it slide the layers
    from ``max_window_layers`` on (what Qwen2's config class derives).
    """
    window = getattr(cfg, "sliding_window", None)
    if window is None or not getattr(cfg, "use_sliding_window", True):
        return {}
    kinds = getattr(cfg, "layer_types", None)
    if kinds is None and getattr(cfg, "max_window_layers", None) is not None:
        kinds = [SLIDING if layer >= cfg.max_window_layers else FULL for layer in range(num_layers)]
    pattern = tuple(int(kind == SLIDING) for kind in kinds) if kinds is not None else None
    if pattern is not None and not any(pattern):
        return {}
    return {"window_size": int(window), "window_layers": None if pattern is None or all(pattern) else pattern}


def every_layer_window_kwargs(arch: ModelArch) -> dict[str, Any]:
    """transformers kwargs of a config whose ``sliding_window`` applies to every layer (or none).

    Trees this tool wrote before windows were Megatron's ``window_size`` kept the value in ``extra``.
    """
    if arch.window_layers is not None:
        raise BadInputError(f"only some layers use sliding-window attention ({list(arch.window_layers)}); "
                            f"a {arch.family} model slides every layer or none")
    return {"sliding_window": arch.window_size if arch.window_size is not None else arch.extra.get("sliding_window")}


def per_layer_window_kwargs(arch: ModelArch) -> dict[str, Any]:
    """transformers kwargs of a config with ``use_sliding_window``, ``layer_types`` and ``max_window_layers``."""
    pattern = arch.window_layers or (1,) * arch.num_layers
    if arch.window_size is None:
        pattern = (0,) * arch.num_layers
    kwargs = {"use_sliding_window": arch.window_size is not None, "sliding_window": arch.window_size,
              "layer_types": [SLIDING if slides else FULL for slides in pattern]}
    full_prefix = pattern.index(1) if 1 in pattern else arch.num_layers
    if pattern == (0,) * full_prefix + (1,) * (arch.num_layers - full_prefix) and arch.window_size is not None:
        kwargs["max_window_layers"] = full_prefix  # what the config class would derive layer_types from
    return kwargs


# ---- mixture-of-experts conventions of transformers configs and checkpoints --------------------

def moe_layers_from_hf_config(cfg: Any, num_layers: int) -> tuple[int, ...] | None:
    """``ModelArch.moe_layers`` of ``decoder_sparse_step`` and ``mlp_only_layers``: layer i routes to experts
    when (i + 1) % step == 0 and i is not listed (transformers' Qwen2-MoE / Qwen3-MoE decoder layers);
    None when every layer does."""
    step = getattr(cfg, "decoder_sparse_step", None)
    step = 1 if step is None else step
    dense = getattr(cfg, "mlp_only_layers", None) or []
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise BadInputError(f"decoder_sparse_step is {step!r}, not a whole number of at least 1")
    if not isinstance(dense, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < num_layers for i in dense):
        raise BadInputError(f"mlp_only_layers is {dense!r}, not a list of layer indices below {num_layers}")
    pattern = tuple(int((layer + 1) % step == 0 and layer not in dense) for layer in range(num_layers))
    if not any(pattern):
        raise BadInputError(f"decoder_sparse_step {step} and mlp_only_layers {list(dense)} leave no layer with experts")
    return None if all(pattern) else pattern


def sparse_step_kwargs(arch: ModelArch) -> dict[str, Any]:
    """``decoder_sparse_step`` and ``mlp_only_layers`` describing ``arch.moe_layers``: the values the source's
    config recorded (``arch.extra``) when they still describe it, else a sparse step alone when one does,
    else step 1 and the dense layers listed."""
    recorded = {"decoder_sparse_step": arch.extra.get("decoder_sparse_step") or 1,
                "mlp_only_layers": arch.extra.get("mlp_only_layers") or []}
    dense = [layer for layer in range(arch.num_layers) if not arch.is_moe_layer(layer)]
    candidates = [recorded, *({"decoder_sparse_step": step, "mlp_only_layers": []}
                              for step in range(1, arch.num_layers + 1)),
                  {"decoder_sparse_step": 1, "mlp_only_layers": dense}]
    for kwargs in candidates:
        try:
            if moe_layers_from_hf_config(SimpleNamespace(**kwargs), arch.num_layers) == arch.moe_layers:
                return kwargs
        except BadInputError:
            continue
    raise BadInputError(f"no decoder_sparse_step and mlp_only_layers describe the expert layers {arch.moe_layers}")


def softmax_routing(renormalise: bool) -> dict[str, Any]:
    """``ModelArch`` router fields of transformers' softmax router: softmax over every expert, top-k, and with
    ``norm_topk_prob`` the k weights divided by their sum. Unrenormalised that is megatron-core's
    ``moe_router_pre_softmax``; renormalised, its default top-k of the logits then softmax over the k, which
    gives the same weights (softmax(x)_i / sum over the k of softmax(x)_j = exp(x_i) / sum over the k of exp(x_j))."""
    return {"moe_router_score_function": "softmax", "moe_router_pre_softmax": not renormalise,
            "moe_router_topk_scaling_factor": None}


def norm_topk_prob(arch: ModelArch) -> bool:
    """transformers' ``norm_topk_prob`` of the architecture's router; refuses a router a softmax router with or
    without renormalisation does not compute (sigmoid scores, scaled weights, groups of experts)."""
    scaling = arch.moe_router_topk_scaling_factor
    if arch.moe_router_score_function != "softmax" or scaling not in (None, 1.0):
        raise BadInputError(f"the router scores experts with {arch.moe_router_score_function}"
                            f"{f' and scales them by {scaling}' if scaling not in (None, 1.0) else ''}; a {arch.family} "
                            "router takes a softmax and does not scale")
    if arch.moe_router_group_topk:
        raise BadInputError(f"the router limits each token to {arch.moe_router_group_topk} of "
                            f"{arch.moe_router_num_groups} groups of experts, which a {arch.family} router does not")
    return not arch.moe_router_pre_softmax


def _gate_up_per_expert(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[gate_0, up_0, gate_1, up_1, ...] -> [experts, 2*ffn, hidden] with gate rows then up rows."""
    return stack([cat(pair, dim=0) for pair in zip(tensors[0::2], tensors[1::2])])


def _down_per_expert(tensors: list[torch.Tensor]) -> torch.Tensor:
    return stack(tensors)


_LAYER_NAME = r"^(model\.layers\.\d+\.)"


def per_expert_aliases(names: list[str], experts: str, gate: str, up: str, down: str) -> dict[str, tuple[list[str], Callable]]:
    """transformers 5's fused expert tensors (``mlp.experts.gate_up_proj`` [experts, 2*ffn, hidden], gate rows
    then up rows, and ``mlp.experts.down_proj`` [experts, hidden, ffn]) as aliases of the per-expert tensors
    older versions wrote: ``model.layers.N.{experts}{E}.{gate,up,down}.weight``."""
    pattern = re.compile(_LAYER_NAME + re.escape(experts) + r"(\d+)\." + re.escape(gate) + r"\.weight$")
    counts: dict[str, int] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    aliases: dict[str, tuple[list[str], Callable]] = {}
    for prefix, count in counts.items():
        stored = f"{prefix}{experts}"
        aliases[prefix + "mlp.experts.gate_up_proj"] = (
            [f"{stored}{e}.{part}.weight" for e in range(count) for part in (gate, up)], _gate_up_per_expert)
        aliases[prefix + "mlp.experts.down_proj"] = ([f"{stored}{e}.{down}.weight" for e in range(count)],
                                                     _down_per_expert)
    return aliases
