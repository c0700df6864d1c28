"""Megatron key schemas: legacy (``language_model.*``), mcore local spec and mcore Transformer Engine.

Internally every tensor is named in the mcore local-spec schema (``decoder.layers.N.input_layernorm.weight``,
``decoder.layers.N.self_attention.linear_qkv.weight`` ...). This module renames to and from the
other schemas and recognises the older spellings legacy checkpoints used.
"""
from __future__ import annotations

import re
from typing import Any, Collection, Iterator

LEGACY = "legacy"
MCORE_LOCAL = "local"
MCORE_TE = "transformer_engine"
SCHEMAS = (LEGACY, MCORE_LOCAL, MCORE_TE)

EMBEDDING = "embedding.word_embeddings.weight"
POSITION_EMBEDDING = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."

# mcore local-spec layer key prefix -> legacy spelling (written), in order of specificity.
_LEGACY_LAYER = (
    ("self_attention.linear_qkv.", "self_attention.query_key_value."),
    ("self_attention.linear_proj.", "self_attention.dense."),
    ("pre_mlp_layernorm.", "post_attention_layernorm."),
    ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
    ("mlp.linear_fc2.", "mlp.dense_4h_to_h."),
)
# Older legacy spellings accepted on read -> the spelling above.
_LEGACY_ALIASES = (
    ("attention.", "self_attention."),
    ("input_norm.", "input_layernorm."),
    ("post_attention_norm.", "post_attention_layernorm."),
    ("final_norm.", "final_layernorm."),
)
# Transformer Engine fuses a norm into the linear layer after it, when the layer has that linear layer
# (multi-latent attention: its q and kv latent norms into the up projections, its input norm stays apart).
_TE_NORMS = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
    ("self_attention.q_layernorm.weight", "self_attention.linear_q_up_proj.layer_norm_weight"),
    ("self_attention.kv_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight"),
    ("norm.weight", "mixer.in_proj.layer_norm_weight"),  # a hybrid model's Mamba layer (megatron-core's MambaLayer)
)
# A standard layer's weights as far as the fused norms go (callers that do not say which weights a layer has)
STANDARD_LAYER = frozenset({"self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"})
# megatron-core's local spec names the standard layer's norms as Transformer Engine does in torch_dist
# (its ``sharded_state_dict_keys_map``); its multi-latent attention layer has no such map.
_LOCAL_DIST_NORMS = _TE_NORMS[:4]
_LEGACY_GLOBAL = {
    EMBEDDING: "language_model.embedding.word_embeddings.weight",
    POSITION_EMBEDDING: "language_model.embedding.position_embeddings.weight",
    OUTPUT_LAYER: "language_model.output_layer.weight",
    "decoder.final_layernorm.weight": "language_model.encoder.final_layernorm.weight",
    "decoder.final_layernorm.bias": "language_model.encoder.final_layernorm.bias",
}
# Legacy nesting: embedding and output layer are module state dicts, the encoder is one flat dict.
_LEGACY_GLOBAL_PATHS = {
    EMBEDDING: ("language_model", "embedding", "word_embeddings", "weight"),
    POSITION_EMBEDDING: ("language_model", "embedding", "position_embeddings", "weight"),
    OUTPUT_LAYER: ("language_model", "output_layer", "weight"),
    "decoder.final_layernorm.weight": ("language_model", "encoder", "final_layernorm.weight"),
    "decoder.final_layernorm.bias": ("language_model", "encoder", "final_layernorm.bias"),
}
LEGACY_TIED_COPY = "word_embeddings_for_head.weight"
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LEGACY_LAYER_KEY = re.compile(r"^language_model\.(?:encoder|transformer)\.layers\.(\d+)\.(.+)$")
# A multi-token prediction layer's transformer layer (megatron-core 0.16.1 names it ``transformer_layer``, later
# releases ``mtp_model_layer`` in plain state dicts): its tensors are named as a decoder layer's after the prefix.
MTP_LAYER = re.compile(r"^(mtp\.layers\.\d+\.)(?:transformer_layer|mtp_model_layer)\.(.+)$")
MTP_TRANSFORMER_LAYER = "transformer_layer."
IGNORED_SUFFIXES = ("_extra_state", "rotary_pos_emb.inv_freq", "inv_freq", "attention.bias", "masked_bias")


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten nested legacy dicts into dotted keys (``language_model.encoder.layers.0...``)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, name + ".")
        else:
            yield name, value


def detect_schema(flat_keys: list[str]) -> str:
    """Which schema a rank file's model keys are written in."""
    if any(key.startswith("language_model.") or key == LEGACY_TIED_COPY for key in flat_keys):
        return LEGACY
    if any(key.endswith("layer_norm_weight") for key in flat_keys):
        return MCORE_TE
    return MCORE_LOCAL


def is_ignored(key: str) -> bool:
    """Non-weight entries: TE extra state, rotary buffers, attention masks."""
    return key.endswith(IGNORED_SUFFIXES)


def _replace_prefix(key: str, pairs: tuple[tuple[str, str], ...], reverse: bool = False) -> str:
    for canonical, other in pairs:
        source, target = (other, canonical) if reverse else (canonical, other)
        if key.startswith(source):
            return target + key[len(source):]
    return key


def _legacy_layer_to_canonical(rel: str) -> str:
    for alias, spelling in _LEGACY_ALIASES:
        if rel.startswith(alias):
            rel = spelling + rel[len(alias):]
    return _replace_prefix(rel, _LEGACY_LAYER, reverse=True)


_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
SEQUENTIAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def _te_to_canonical(rel: str) -> str:
    for canonical, te_name in _TE_NORMS:
        if rel == te_name:
            return canonical
    grouped = _TE_GROUPED_EXPERT.match(rel)
    if grouped:  # TEGroupedMLP: mlp.experts.linear_fc1.weight7 -> SequentialMLP naming
        return f"mlp.experts.local_experts.{grouped.group(3)}.{grouped.group(1)}.{grouped.group(2)}"
    return rel


def canonical_name(stored: str, schema: str) -> tuple[int | None, str]:
    """(stage-local layer index or None, canonical key) for a stored flat key.

    For a layer tensor the canonical key is relative to its layer; otherwise it is global.
    The legacy tied-embedding copy maps to ``output_layer.weight``.
    """
    if schema == LEGACY:
        match = _LEGACY_LAYER_KEY.match(stored)
        if match:
            return int(match.group(1)), _legacy_layer_to_canonical(match.group(2))
        if stored == LEGACY_TIED_COPY:
            return None, OUTPUT_LAYER
        stored = re.sub(r"^language_model\.transformer\.", "language_model.encoder.", stored)
        stored = stored.replace("encoder.final_norm.", "encoder.final_layernorm.")
        reverse = {legacy: canonical for canonical, legacy in _LEGACY_GLOBAL.items()}
        return None, reverse.get(stored, stored)
    match = _LAYER_KEY.match(stored)
    if match:
        return int(match.group(1)), _te_to_canonical(match.group(2))
    mtp = MTP_LAYER.match(stored)
    if mtp:
        return None, mtp.group(1) + MTP_TRANSFORMER_LAYER + _te_to_canonical(mtp.group(2))
    return None, stored


_TOWER_LAYER_KEY = re.compile(r"^(.+\.decoder\.layers\.\d+\.)(.+)$")


def tower_canonical_name(stored: str) -> str:
    """A tower's whole key (megatron-core's vision model, ``vision_model.decoder.layers.N.``) with its layers'
    norms in local-spec names."""
    match = _TOWER_LAYER_KEY.match(stored)
    return match.group(1) + _te_to_canonical(match.group(2)) if match else stored


def te_name(rel: str, layer_weights: Collection[str]) -> str:
    """A layer tensor's Transformer Engine name: a norm fused into the linear layer after it, if the layer has it."""
    for local_name, fused in _TE_NORMS:
        if rel == local_name and fused.rsplit(".", 1)[0] + ".weight" in layer_weights:
            return fused
    return rel


def stored_path(canonical: str, layer: int | None, schema: str, tied_copy: bool = False,
                layer_weights: Collection[str] = STANDARD_LAYER, grouped_experts: bool = False) -> tuple[str, ...]:
    """Where a canonical tensor goes inside a rank file's ``model`` dict (a path of dict keys).

    ``layer_weights``: the canonical names of the layer's weights (which linear layers Transformer Engine
    fuses norms into)."""
    if schema == LEGACY:
        if tied_copy:
            return ("word_embeddings_for_head", "weight")
        if layer is not None:
            rel = _replace_prefix(canonical, _LEGACY_LAYER)
            return ("language_model", "encoder", f"layers.{layer}.{rel}")
        return _LEGACY_GLOBAL_PATHS[canonical]
    mtp = MTP_LAYER.match(canonical) if layer is None else None
    if layer is None and not mtp:
        return (canonical,)
    rel = mtp.group(2) if mtp else canonical
    expert = SEQUENTIAL_EXPERT.match(rel)
    if expert and grouped_experts:
        rel = f"mlp.experts.{expert.group(2)}.{expert.group(3)}{expert.group(1)}"
    if schema == MCORE_TE:
        rel = te_name(rel, layer_weights)
    return (f"{mtp.group(1)}{MTP_TRANSFORMER_LAYER}{rel}" if mtp else f"{LAYER_PREFIX}{layer}.{rel}",)


MAMBA_LINEARS = ("mixer.in_proj", "mixer.out_proj")  # a Mamba mixer's linear layers (megatron-core's MambaMixer)


def te_norm_module(key: str) -> str | None:
    """The module of ``key`` when it is the weight of a norm that megatron-core's Transformer Engine spec builds as a
    module of its own (``TENorm``: ``final_layernorm``, ``q_layernorm`` / ``k_layernorm``, a MoE layer's
    ``pre_mlp_layernorm``, MLA's ``input_layernorm``), else None. Transformer Engine 1.13 and later builds its
    ``LayerNorm`` / ``RMSNorm`` on its operation API, whose modules carry ``_extra_state`` (TE 1.12 and earlier: no
    extra state); fused norms (``linear_*.layer_norm_weight``) are part of their linear layer's."""
    module, _, param = key.rpartition(".")
    return module if param == "weight" and module.rsplit(".", 1)[-1].endswith("layernorm") else None


def extra_state_keys(weight_keys: list[str], schema: str, last_stage: bool) -> list[str]:
    """``_extra_state`` entries megatron-core modules expose in their state dicts (value None).

    Every mcore linear layer (``linear_*`` and the output layer) has one, whether or not its
    weight is stored on this stage; the Transformer Engine attention also has one, and so has every norm that is a
    module of its own under Transformer Engine (:func:`te_norm_module`).
    """
    if schema == LEGACY:
        return []
    modules = []
    for key in weight_keys:
        module = key.rsplit(".", 1)[0]
        last = module.rsplit(".", 1)[-1]
        if (last.startswith("linear_") or last == "eh_proj" or module.endswith(MAMBA_LINEARS)) and module not in modules:  # eh_proj: an MTP layer's
            modules.append(module)
    if schema == MCORE_TE:
        modules += sorted({m.replace("linear_proj", "core_attention") for m in modules
                           if m.endswith("self_attention.linear_proj")})
        modules += [module for module in map(te_norm_module, weight_keys) if module]
    if last_stage:
        modules.append("output_layer")
    return [f"{module}._extra_state" for module in modules]


def torch_dist_key(canonical: str, layer: int | None, layer_weights: Collection[str], transformer_engine: bool,
                   stacked: bool = True) -> str:
    """The torch_dist key of a canonical tensor: experts on a stacked ``experts.experts`` key, norms as
    megatron-core names them there.

    ``stacked``: the key carries no layer index (layers are the leading axis of one global tensor); else each
    layer has keys of its own, ``decoder.layers.N.…`` (see :func:`layers_stored_apart`). Transformer Engine
    names norms fused into the linear after them (:func:`te_name`: an expert layer's pre-MLP norm is
    ``pre_mlp_layernorm.weight``); the local spec maps a standard layer's norms to those names
    (``mlp.linear_fc1.layer_norm_weight`` even in an expert layer) and keeps a multi-latent attention
    layer's own names (measured on megatron-core 0.16.1).
    """
    mtp = MTP_LAYER.match(canonical) if layer is None else None
    if layer is None and not mtp:
        return canonical
    if mtp:  # a multi-token prediction layer: keys of its own, as a layer stored apart
        prefix, canonical = mtp.group(1) + MTP_TRANSFORMER_LAYER, mtp.group(2)
    else:
        prefix = LAYER_PREFIX if stacked else f"{LAYER_PREFIX}{layer}."
    expert = SEQUENTIAL_EXPERT.match(canonical)
    if expert:
        return f"{prefix}mlp.experts.experts.{expert.group(2)}.{expert.group(3)}"
    if transformer_engine:
        return prefix + te_name(canonical, layer_weights)
    if "self_attention.linear_qkv.weight" in layer_weights:
        canonical = dict(_LOCAL_DIST_NORMS).get(canonical, canonical)
    return prefix + canonical


def layers_stored_apart(moe_layers: tuple[int, ...] | None) -> bool:
    """Whether torch_dist stores each layer under keys of its own: megatron-core 0.16.1 does when its layers
    differ (``TransformerBlock.sharded_state_dict``: a ``moe_layer_freq`` list, or an int above 1, which this
    tool writes as a list), and stacks every layer's tensor on a leading layer axis otherwise."""
    return moe_layers is not None


PER_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")  # torch_dist keys of layers stored apart


# Tensors megatron-core stores in torch_dist as one key per fused part, ``<key>.<part>`` in this order (a Mamba
# mixer's, ``MambaMixer.sharded_state_dict``: in_proj rows [z, x, B, C, dt], the convolution's channels [x, B, C]).
NAMED_PARTS = {"mixer.in_proj.weight": ("z", "x", "B", "C", "dt"), "mixer.conv1d.weight": ("x", "B", "C"),
               "mixer.conv1d.bias": ("x", "B", "C")}


def named_part(canonical: str) -> tuple[str, str] | None:
    """(whole tensor, part) of a torch_dist key's canonical name that is one part of a :data:`NAMED_PARTS` tensor."""
    base, _, part = canonical.rpartition(".")
    return (base, part) if part in NAMED_PARTS.get(base, ()) else None


def without_part(key: str) -> str:
    """A stored key with the part name of a :data:`NAMED_PARTS` tensor dropped (the whole tensor's key)."""
    for base, parts in NAMED_PARTS.items():
        for part in parts:
            if key.endswith(f".{base}.{part}"):
                return key[:-len(part) - 1]
    return key
