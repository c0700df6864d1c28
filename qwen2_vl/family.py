"""Qwen2-VL and Qwen2.5-VL: three towers (``Tower`` in ``checkpoint_convert/model/family.py``).

- the language model is Qwen2's table (``qwen2.family.LAYER``, Llama's embeddings and head) under
  ``model.language_model.`` in transformers 5 (older checkpoints: ``model.``), with megatron-core's multimodal
  rotary embeddings (``position_embedding_type`` mrope, ``mrope_section`` from the text config's rope parameters);
- the vision tower (``model.visual.``, older ``visual.``): a patch embedding and ``vision_config.depth`` blocks;
- the merger (``model.visual.merger.``): a norm and a two-layer MLP projecting merged patches to the hidden size.

Megatron-Bridge (``models/qwen_vl/qwen25_vl_bridge.py``) keeps the vision tower and merger as Hugging Face stores
them, replicated, under ``visual.`` (its ``ReplicatedMapping("visual.**")``), and the language model as megatron-core
GPT names under ``language_model.``; its provider is ``Qwen25VLModelProvider``. No Megatron-Bridge release has a
provider for Qwen2-VL, whose vision blocks differ (LayerNorm with biases, a GELU fc1/fc2 MLP): it is refused there
and written in MindSpeed-MM's layout.
The vision config and the image/video token ids travel in ``ModelArch.extra``.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Callable

import torch

from checkpoint_convert.model import (BadInputError, BridgeProvider, FamilySpec, ModelArch, Param, Style, Tower,
                                      TowerLayout, gate_up_to_hf, gate_up_to_megatron, per_layer_window_kwargs,
                                      register, transformers_attr)
from llama.family import FIRST, LAST
from llama.hf_config import arch_from_llama_config, config_kwargs
from qwen2.family import LAYER

VISION_CONFIG = "vision_config"
TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_TRANSFORMERS = "transformers.models.{0}.configuration_{0}."


def _reprefixed(params: tuple[Param, ...], old: str, new: str) -> tuple[Param, ...]:
    """The table with Hugging Face names under ``old`` moved under ``new`` (the head stays where it is)."""
    return tuple(dataclasses.replace(p, hf=tuple(new + n[len(old):] if n.startswith(old) else n for n in p.hf))
                 for p in params)


def _kept(*names: str) -> tuple[Param, ...]:
    """Tensors Megatron-Bridge stores as Hugging Face does: same name, whole on every rank."""
    return tuple(Param(name, (name,), Style.REPLICATED) for name in names)


def _depth(arch: ModelArch) -> int:
    return int(arch.extra[VISION_CONFIG]["depth"])


def _linear(*modules: str) -> tuple[str, ...]:
    return tuple(f"{module}.{kind}" for module in modules for kind in ("weight", "bias"))


QWEN2_5_BLOCK = _kept("norm1.weight", "norm2.weight", *_linear("attn.qkv", "attn.proj", "mlp.gate_proj",
                                                                "mlp.up_proj", "mlp.down_proj"))
QWEN2_BLOCK = _kept(*_linear("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
MERGER = _linear("mlp.0", "mlp.2")


def vl_towers(block: tuple[Param, ...], merger: tuple[Param, ...]) -> tuple[Tower, Tower]:
    """The vision tower and its merger, named as transformers 5 and Megatron-Bridge store them."""
    vision = Tower("vision", "model.visual.", "visual.", first=_kept("patch_embed.proj.weight"), layer=block,
                   num_layers=_depth, hf_layer_prefix="blocks.{layer}.", megatron_layer_prefix="blocks.{layer}.")
    return vision, Tower("merger", "model.visual.merger.", "visual.merger.", first=merger)


def older_spelling(names: list[str]) -> dict[str, tuple[list[str], Any]]:
    """transformers 4's names (``model.layers.*``, ``visual.*``) as aliases of transformers 5's."""
    if not any(name.startswith("visual.") for name in names):
        return {}
    moved = {name: "model." + name if name.startswith("visual.") else name.replace("model.", "model.language_model.", 1)
             for name in names if name.startswith(("visual.", "model."))}
    return {current: ([stored], _single) for stored, current in moved.items()}


def _single(tensors: list[Any]) -> Any:
    return tensors[0]


def _plain(config: Any, config_class: str) -> dict[str, Any]:
    """A vision config's architecture fields as plain values (the config class's own fields only)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    fields = transformers_attr(config_class).__annotations__
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items() if key in fields}


def _mrope_section(text: Any) -> tuple[int, ...]:
    section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
    if not section:
        raise BadInputError("text_config's rope parameters have no mrope_section (the multimodal rotary sections)")
    return tuple(int(n) for n in section)


def _token_id(cfg: Any, key: str, vocab_size: int) -> int:
    """An image/video token id: an embedding row of the language model."""
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise BadInputError(f"{key} is {value!r}, not a token id below the vocabulary size {vocab_size}")
    return value


def _arch_reader(name: str, vision_class: str):
    def from_config(cfg: Any) -> ModelArch:
        text = cfg.text_config  # the tied head is the outer config's (transformers 5)
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        text = SimpleNamespace(**{**(text if isinstance(text, dict) else text.to_dict()), "tie_word_embeddings": tie})
        arch = arch_from_llama_config(text, name, ("max_window_layers",))
        extra = {**arch.extra, VISION_CONFIG: _plain(cfg.vision_config, vision_class),
                 **{key: _token_id(cfg, key, arch.vocab_size) for key in TOKENS}}
        return arch.replace(position_embedding_type="mrope", mrope_section=_mrope_section(text), add_qkv_bias=True,
                            add_bias_linear=False, extra=extra)
    return from_config


def _config_writer(config_class: str, architecture: str):
    def to_config(arch: ModelArch) -> Any:
        text = config_kwargs(arch.replace(extra={k: v for k, v in arch.extra.items()
                                                 if k not in (VISION_CONFIG, *TOKENS)}))
        text.update(per_layer_window_kwargs(arch))
        text["rope_parameters"]["mrope_section"] = list(arch.mrope_section or ())
        tie = text.pop("tie_word_embeddings")
        return transformers_attr(config_class)(
            architectures=[architecture], text_config=text, vision_config=dict(arch.extra[VISION_CONFIG]),
            tie_word_embeddings=tie, dtype=text["dtype"], **{key: arch.extra.get(key) for key in TOKENS})
    return to_config


def _matcher(vision_field: str):
    """Qwen2's language model with multimodal rotary embeddings; the vision config tells the two models apart."""
    def matches(arch: ModelArch) -> bool:
        return (arch.normalization == "RMSNorm" and arch.activation == "swiglu" and arch.position_embedding_type == "mrope"
                and arch.add_qkv_bias and not arch.add_bias_linear and not arch.num_experts and not arch.qk_layernorm
                and vision_field in (arch.extra.get(VISION_CONFIG) or {}))
    return matches


def _to_provider(arch: ModelArch) -> dict[str, Any]:
    vision = {"_target_": _TRANSFORMERS.format("qwen2_5_vl") + "Qwen2_5_VLVisionConfig", **arch.extra[VISION_CONFIG]}
    ids = {key: arch.extra.get(key) for key in ("bos_token_id", "eos_token_id", *TOKENS)}
    return {VISION_CONFIG: vision, **{key: value for key, value in ids.items() if value is not None}}


def _from_provider(model: dict[str, Any]) -> dict[str, Any]:
    vision = {key: value for key, value in dict(model.get(VISION_CONFIG) or {}).items() if key != "_target_"}
    return {VISION_CONFIG: vision, **{key: model.get(key) for key in ("bos_token_id", "eos_token_id", *TOKENS)}}


# Megatron-Bridge's ``models/qwen_vl/`` (0.6.2 and main): Qwen2.5-VL, Qwen3-VL, Qwen3.5-VL and Qwen2.5-Omni only
NO_QWEN2_VL_BRIDGE = ("no Megatron-Bridge release has a Qwen2-VL provider (its models/qwen_vl/ holds Qwen2.5-VL's, "
                      "Qwen3-VL's, Qwen3.5-VL's and Qwen2.5-Omni's)")
QWEN2_5_VL_BRIDGE = BridgeProvider(
    writes="megatron.bridge.models.qwen_vl.qwen25_vl_provider.Qwen25VLModelProvider",
    fields=(VISION_CONFIG, "bos_token_id", "eos_token_id", *TOKENS, "vision_token_id"),
    to_provider=_to_provider, from_provider=_from_provider)


def image_and_text(arch: ModelArch) -> dict[str, torch.Tensor]:
    """A fixed image+text input as Qwen-VL's processor builds one: text, the vision start token, one image token per
    merged patch, the vision end token, text; the image's patches (random, seeded) and its grid (t, h, w)."""
    vision, merge = arch.extra[VISION_CONFIG], int(arch.extra[VISION_CONFIG]["spatial_merge_size"])
    grid = torch.tensor([[1, 2 * merge, 2 * merge]])
    special = {arch.extra[key] for key in TOKENS}
    ordinary = [token for token in range(min(arch.vocab_size, 256)) if token not in special] or [0]
    text = [ordinary[token % len(ordinary)] for token in (5, 9, 17, 42, 8, 77)]
    ids = torch.tensor([text[:2] + [arch.extra["vision_start_token_id"]] + [arch.extra["image_token_id"]] * 4
                        + [arch.extra["vision_end_token_id"]] + text[2:]])
    patch = int(vision["in_channels"]) * int(vision["temporal_patch_size"]) * int(vision["patch_size"]) ** 2
    pixels = torch.randn(int(grid.prod()), patch, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == arch.extra["image_token_id"]).int()}


# ---- MindSpeed-MM's layout (its converter ``checkpoint/vlm_model/converters/qwen2vl.py``, ``qwen2_5vl.py``):
# the vision tower in megatron-core form under ``image_encoder.``, qkv interleaved per head (its ``RelocateOp``, with
# Qwen2-VL's ``embed_dim`` or Qwen2.5-VL's ``hidden_size`` as the head block), Qwen2.5-VL's gate/up fused
# (``UpGateMergeOp``), the merger as its projector, the language model under ``text_decoder.``

def _swap_leading(tensor: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Rows in ``outer`` x ``inner`` blocks reordered as ``inner`` x ``outer`` (weights and biases alike)."""
    tail = tensor.shape[1:]
    return tensor.reshape(outer, inner, -1, *tail).transpose(0, 1).reshape(-1, *tail)


def _qkv_per_head(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """transformers' [q; k; v] -> MindSpeed-MM's [q_h, k_h, v_h] for each head (one query group per head)."""
    return _swap_leading(tensors[0], 3, int(arch.extra[VISION_CONFIG]["num_heads"]))


def _qkv_concatenated(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [_swap_leading(tensor, int(arch.extra[VISION_CONFIG]["num_heads"]), 3)]


def _mm(megatron: str, hf: tuple[str, ...] | str, style: Style = Style.REPLICATED, **kwargs: Any) -> Param:
    return Param(megatron, (hf,) if isinstance(hf, str) else hf, style, **kwargs)


def _mm_linear(megatron: str, hf: str, weight: Style, bias: Style) -> tuple[Param, ...]:
    return _mm(f"{megatron}.weight", f"{hf}.weight", weight), _mm(f"{megatron}.bias", f"{hf}.bias", bias)


_MM_ATTENTION = (
    *(_mm(f"self_attention.linear_qkv.{kind}", f"attn.qkv.{kind}", Style.COLUMN, to_megatron=_qkv_per_head,
          to_hf=_qkv_concatenated) for kind in ("weight", "bias")),
    *_mm_linear("self_attention.linear_proj", "attn.proj", Style.ROW, Style.REPLICATED),
)
QWEN2_5_MM_BLOCK = (
    _mm("input_layernorm.weight", "norm1.weight"),
    *_MM_ATTENTION,
    _mm("pre_mlp_layernorm.weight", "norm2.weight"),
    *(_mm(f"mlp.linear_fc1.{kind}", (f"mlp.gate_proj.{kind}", f"mlp.up_proj.{kind}"), Style.GLU_COLUMN,
          to_megatron=gate_up_to_megatron, to_hf=gate_up_to_hf) for kind in ("weight", "bias")),
    *_mm_linear("mlp.linear_fc2", "mlp.down_proj", Style.ROW, Style.REPLICATED),
)
_MM_MERGER_MLP = (
    *_mm_linear("projector.encoder.linear_fc1", "merger.mlp.0", Style.COLUMN, Style.COLUMN),
    *_mm_linear("projector.encoder.linear_fc2", "merger.mlp.2", Style.ROW, Style.REPLICATED),
)
QWEN2_5_MM_PROJECTOR = (_mm("projector.layernorm.weight", "merger.ln_q.weight"), *_MM_MERGER_MLP)
# Qwen2-VL (its ``create_qwen2vl_ops``, ``qwen2vl_tp_patterns``): LayerNorms with biases, whole on every rank; the
# GELU MLP renamed fc1/fc2 -> linear_fc1/linear_fc2, fc1 split by rows with its bias, fc2 by columns
QWEN2_MM_BLOCK = (
    *_mm_linear("input_layernorm", "norm1", Style.REPLICATED, Style.REPLICATED),
    *_MM_ATTENTION,
    *_mm_linear("pre_mlp_layernorm", "norm2", Style.REPLICATED, Style.REPLICATED),
    *_mm_linear("mlp.linear_fc1", "mlp.fc1", Style.COLUMN, Style.COLUMN),
    *_mm_linear("mlp.linear_fc2", "mlp.fc2", Style.ROW, Style.REPLICATED),
)
QWEN2_MM_PROJECTOR = (*_mm_linear("projector.layernorm", "merger.ln_q", Style.REPLICATED, Style.REPLICATED),
                      *_MM_MERGER_MLP)


def _tp_splits(width: str, mlp_width: Callable[[dict[str, Any]], int]) -> Callable[[ModelArch], tuple]:
    """The vision sizes MindSpeed-MM's converter splits over TP ranks: the heads (qkv relocated per head, proj), the
    MLP width (fc1 rows, fc2 columns) and the projector's (its fc1 rows: the merged patch, spatial_merge_size^2
    patches of ``width``)."""
    def splits(arch: ModelArch) -> tuple[tuple[str, int], ...]:
        vision = arch.extra[VISION_CONFIG]
        return (("vision attention heads (vision_config.num_heads)", int(vision["num_heads"])),
                ("vision MLP width", mlp_width(vision)),
                ("projector width", int(vision[width]) * int(vision["spatial_merge_size"]) ** 2))
    return splits


def _qwen2_5_mlp_width(vision: dict[str, Any]) -> int:
    return int(vision["intermediate_size"])


def _qwen2_mlp_width(vision: dict[str, Any]) -> int:
    """transformers' ``Qwen2VLVisionBlock``: ``int(embed_dim * mlp_ratio)``."""
    return int(vision["embed_dim"] * vision["mlp_ratio"])


def mindspeed_mm_layout(block: tuple[Param, ...], projector: tuple[Param, ...], width: str,
                        mlp_width: Callable[[dict[str, Any]], int]) -> TowerLayout:
    """One tower as MindSpeed-MM's pipeline schema has it: patch embedding first, blocks, projector last."""
    vision = Tower("vision", "model.visual.", "image_encoder.",
                   first=(_mm("encoder.patch_embed.proj.weight", "patch_embed.proj.weight"),), layer=block,
                   last=projector, num_layers=_depth, hf_layer_prefix="blocks.{layer}.",
                   megatron_layer_prefix="encoder.blocks.layers.{layer}.")
    return TowerLayout((vision,), "text_decoder.", _tp_splits(width, mlp_width))


def vl_family(name: str, prefix: str, block: tuple[Param, ...], merger: tuple[Param, ...], vision_field: str,
              bridge: BridgeProvider | None, mindspeed_mm: TowerLayout | None = None,
              bridge_missing: str = "") -> FamilySpec:
    """A Qwen-VL family: transformers' ``{prefix}Config`` / ``{prefix}ForConditionalGeneration``."""
    return FamilySpec(
        name=name, hf_model_types=(name,), hf_layer_prefix="model.language_model.layers.{layer}.",
        first_stage=_reprefixed(FIRST, "model.", "model.language_model."), layer=LAYER,
        last_stage=_reprefixed(LAST, "model.", "model.language_model."), hf_config_class=f"{prefix}Config",
        arch_from_hf_config=_arch_reader(name, f"{prefix}VisionConfig"),
        hf_config_from_arch=_config_writer(f"{prefix}Config", f"{prefix}ForConditionalGeneration"),
        matches_megatron=_matcher(vision_field), hf_ignored_suffixes=("rotary_emb.inv_freq",), bridge=bridge,
        hf_aliases=older_spelling, towers=vl_towers(block, merger), megatron_prefix="language_model.",
        logits_inputs=image_and_text, mindspeed_mm=mindspeed_mm, bridge_missing=bridge_missing)


QWEN2_5_VL = register(vl_family("qwen2_5_vl", "Qwen2_5_VL", QWEN2_5_BLOCK, _kept("ln_q.weight", *MERGER),
                                "fullatt_block_indexes", QWEN2_5_VL_BRIDGE,
                                mindspeed_mm_layout(QWEN2_5_MM_BLOCK, QWEN2_5_MM_PROJECTOR, "hidden_size",
                                                    _qwen2_5_mlp_width)))
QWEN2_VL = register(vl_family("qwen2_vl", "Qwen2VL", QWEN2_BLOCK, _kept(*_linear("ln_q"), *MERGER), "embed_dim",
                              None, mindspeed_mm_layout(QWEN2_MM_BLOCK, QWEN2_MM_PROJECTOR, "embed_dim",
                                                        _qwen2_mlp_width),
                              NO_QWEN2_VL_BRIDGE))
