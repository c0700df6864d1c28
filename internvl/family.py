"""InternVL 2.5 / 3 (transformers' ``InternVLForConditionalGeneration``): InternViT, a pixel-shuffle projector and a
Qwen2 (InternVL 3, 2.5) or Llama language model.

- the language model is its own family's table and config (``qwen2/``, ``llama/``: ``text_config.model_type``) under
  ``model.language_model.``, the head ``lm_head`` (tied to the embeddings by the outer ``tie_word_embeddings``);
- the vision tower ``model.vision_tower.``: a class token, a patch embedding and absolute positions, then
  ``vision_config.num_hidden_layers`` pre-norm blocks (LayerNorm or RMSNorm per ``norm_type``, q/k/v with biases per
  ``attention_bias``, an optional RMSNorm over all heads of q and of k per ``use_qk_norm``, a GELU fc1/fc2 MLP), each
  branch scaled by a learned vector (layer scale ``lambda_1``, ``lambda_2``);
- the projector ``model.multi_modal_projector.``: a LayerNorm and two linears over pixel-shuffled patches.

The only Megatron layout here is MindSpeed-MM's (its converter ``checkpoint/vlm_model/converters/internvl.py``): one
tower ``image_encoder.`` (embeddings first, blocks, projector last: its ``vision_schema``), q/k/v concatenated as
[q; k; v] (no per-head re-ordering: its InternViT attention reshapes the fused output as [3, heads, head_dim]), split
over tensor-parallel ranks part by part (its ``UnalignedRowSplit`` at an even head count), layer scale as ``ls1`` /
``ls2``; the language model under ``text_decoder.`` with megatron-core GPT's local names. transformers 5 writes the
older names ``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``
(its ``llava`` conversion mapping): both spellings are read.
"""
from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace
from typing import Any, Callable

import torch

from checkpoint_convert.model import (BadInputError, FamilySpec, ModelArch, Param, Style, Tower, TowerLayout, cat,
                                      register, transformers_attr)
from llama.family import DENSE_MLP, FIRST, LAST, LLAMA, OUT_BIAS, PRE_MLP_NORM, SELF_ATTENTION
from qwen2.family import QWEN2
from qwen2_vl.family import _plain, _reprefixed

VISION_CONFIG, TEXT_TYPE = "vision_config", "text_model_type"
OUTER = ("image_token_id", "image_seq_length", "downsample_ratio", "projector_hidden_act", "vision_feature_layer",
         "vision_feature_select_strategy")  # InternVLConfig's own fields, kept in ModelArch.extra
TEXT_FAMILIES = {"qwen2": QWEN2, "llama": LLAMA}
REPLICATED, COLUMN, ROW = Style.REPLICATED, Style.COLUMN, Style.ROW
# what MindSpeed-MM's InternViT cannot hold (it has none of these tensors), as (vision config field, value it needs)
_MINDSPEED_VISION = (("use_mean_pooling", True), ("use_mask_token", False), ("use_absolute_position_embeddings", True))


def _vision(arch: ModelArch) -> dict[str, Any]:
    return arch.extra[VISION_CONFIG]


def _layer_norm(arch: ModelArch) -> bool:
    return _vision(arch)["norm_type"] == "layer_norm"


def _attention_bias(arch: ModelArch) -> bool:
    return bool(_vision(arch)["attention_bias"])


def _qk_norm(arch: ModelArch) -> bool:
    return bool(_vision(arch)["use_qk_norm"])


def _three_parts(arch: ModelArch) -> tuple[int, ...]:
    return (int(_vision(arch)["hidden_size"]),) * 3


def _qkv_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """q, k and v stacked as one [q; k; v] projection, as InternViT's own ``attn.qkv`` (no per-head order)."""
    return cat(list(tensors), dim=0)


def _qkv_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return list(torch.chunk(tensor, 3, dim=0))


def _p(megatron: str, hf: str | tuple[str, ...], style: Style = REPLICATED, **kwargs: Any) -> Param:
    return Param(megatron, (hf,) if isinstance(hf, str) else hf, style, **kwargs)


def _norm(megatron: str, hf: str) -> tuple[Param, ...]:
    """A vision norm: LayerNorm (weight and bias) or RMSNorm (weight), per ``norm_type``."""
    return _p(f"{megatron}.weight", f"{hf}.weight"), _p(f"{megatron}.bias", f"{hf}.bias", when=_layer_norm)


def _qkv(kind: str, **kwargs: Any) -> Param:
    return _p(f"self_attention.linear_qkv.{kind}", tuple(f"attention.{n}_proj.{kind}" for n in "qkv"),
              Style.PARTS_COLUMN, to_hf=_qkv_to_hf, to_megatron=_qkv_to_megatron, parts=_three_parts, **kwargs)


EMBEDDINGS = (
    _p("encoder.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
    _p("encoder.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embeddings.projection.weight"),
    _p("encoder.embeddings.patch_embedding.bias", "vision_tower.embeddings.patch_embeddings.projection.bias"),
    _p("encoder.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
)
BLOCK = (
    *_norm("input_layernorm", "layernorm_before"),
    _qkv("weight"), _qkv("bias", when=_attention_bias),
    _p("self_attention.q_layernorm.weight", "attention.q_norm.weight", when=_qk_norm),  # over all heads: whole
    _p("self_attention.k_layernorm.weight", "attention.k_norm.weight", when=_qk_norm),
    _p("self_attention.linear_proj.weight", "attention.projection_layer.weight", ROW),
    _p("self_attention.linear_proj.bias", "attention.projection_layer.bias"),
    _p("ls1", "lambda_1"),
    *_norm("pre_mlp_layernorm", "layernorm_after"),
    _p("mlp.linear_fc1.weight", "mlp.fc1.weight", COLUMN), _p("mlp.linear_fc1.bias", "mlp.fc1.bias", COLUMN),
    _p("mlp.linear_fc2.weight", "mlp.fc2.weight", ROW), _p("mlp.linear_fc2.bias", "mlp.fc2.bias"),
    _p("ls2", "lambda_2"),
)
PROJECTOR = tuple(_p(f"projector.{megatron}.{kind}", f"multi_modal_projector.{hf}.{kind}")  # whole on every rank
                  for megatron, hf in (("norm", "layer_norm"), ("linear_fc1", "linear_1"), ("linear_fc2", "linear_2"))
                  for kind in ("weight", "bias"))
VISION = Tower("vision", "model.", "image_encoder.", first=EMBEDDINGS, layer=BLOCK, last=PROJECTOR,
               num_layers=lambda arch: int(_vision(arch)["num_hidden_layers"]),
               hf_layer_prefix="vision_tower.encoder.layer.{layer}.",
               megatron_layer_prefix="encoder.encoder.layers.{layer}.")


def _tp_splits(arch: ModelArch) -> tuple[tuple[str, int], ...]:
    """MindSpeed-MM splits the vision heads unevenly when they do not divide (its ``UnalignedRowSplit``): refused; its
    vision fc1 (``RowSplit``) needs an even split too."""
    return (("vision attention heads", int(_vision(arch)["num_attention_heads"])),
            ("vision MLP width", int(_vision(arch)["intermediate_size"])))


MINDSPEED_MM = TowerLayout((VISION,), "text_decoder.", tp_splits=_tp_splits, uneven_vocab=True)


def _llama_only(param: Param) -> Param:
    """Llama's o_proj bias entries, which a Qwen2 language model does not have."""
    def when(arch: ModelArch) -> bool:
        return arch.extra.get(TEXT_TYPE) == "llama" and param.when(arch)
    return dataclasses.replace(param, when=when)


LANGUAGE_LAYER = SELF_ATTENTION + tuple(map(_llama_only, OUT_BIAS)) + PRE_MLP_NORM + DENSE_MLP


def _as_dict(config: Any) -> dict[str, Any]:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config or {})


def _text_family(model_type: str | None) -> FamilySpec:
    if model_type not in TEXT_FAMILIES:
        raise BadInputError(f"text_config has model_type '{model_type}'; an InternVL language model here is "
                            f"{' or '.join(TEXT_FAMILIES)}")
    return TEXT_FAMILIES[model_type]


def arch_from_config(cfg: Any) -> ModelArch:
    """The language model's architecture as its own family reads it (the head tied by the outer config), with the
    vision config and InternVLConfig's own fields in ``extra``."""
    text = _as_dict(cfg.text_config)
    kind = text.get("model_type")
    arch = _text_family(kind).arch_from_hf_config(SimpleNamespace(**{**text, "tie_word_embeddings":
                                                                      bool(cfg.tie_word_embeddings)}))
    vision = {key: value for key, value in _plain(cfg.vision_config, "InternVLVisionConfig").items() if key != "dtype"}
    for field, needed in _MINDSPEED_VISION:
        if vision.get(field, needed) != needed:
            raise BadInputError(f"vision_config has {field} {vision[field]}: a vision tensor MindSpeed-MM's InternViT "
                                "does not hold")
    extra = {**arch.extra, TEXT_TYPE: kind, VISION_CONFIG: vision, **{key: getattr(cfg, key) for key in OUTER}}
    return arch.replace(family="internvl", extra=extra)


def config_from_arch(arch: ModelArch) -> Any:
    """InternVLConfig with the language model's config as its own family writes it."""
    kind = arch.extra[TEXT_TYPE]
    own = {key: value for key, value in arch.extra.items() if key not in (TEXT_TYPE, VISION_CONFIG, *OUTER)}
    text = _text_family(kind).hf_config_from_arch(arch.replace(family=kind, extra=own)).to_dict()
    dtype = text.pop("dtype", None)  # the outer config's, as transformers writes it
    text.pop("architectures", None)
    return transformers_attr("InternVLConfig")(
        architectures=["InternVLForConditionalGeneration"], text_config=text, vision_config=dict(_vision(arch)),
        tie_word_embeddings=arch.tie_embeddings, dtype=dtype, **{key: arch.extra[key] for key in OUTER})


def matches_megatron(arch: ModelArch) -> bool:
    return arch.family == "internvl" or (TEXT_TYPE in arch.extra and "downsample_ratio" in arch.extra)


_OLDER = ((r"^language_model\.lm_head\.", "lm_head."), (r"^language_model\.model\.", "model.language_model."),
          (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."))  # transformers' ``llava`` WeightRenaming


def older_spelling(names: list[str]) -> dict[str, tuple[list[str], Callable]]:
    """The names transformers 5 writes (its ``llava`` mapping reversed) as aliases of the model's own."""
    aliases = {}
    for name in names:
        for pattern, current in _OLDER:
            if re.match(pattern, name):
                aliases[re.sub(pattern, current, name)] = ([name], _single)
                break
    return aliases


def _single(tensors: list[Any]) -> Any:
    return tensors[0]


def image_and_text(arch: ModelArch) -> dict[str, torch.Tensor]:
    """A fixed image+text input: text, one image token per projected patch, text; the image a seeded random one of
    the vision tower's own size (its positions used as trained, without interpolation)."""
    vision = _vision(arch)
    height, width = vision["image_size"]
    patches = (height // vision["patch_size"][0]) * (width // vision["patch_size"][1])
    tokens = int(patches * float(arch.extra["downsample_ratio"]) ** 2)
    image = int(arch.extra["image_token_id"])
    text = [token % min(arch.vocab_size, image) for token in (5, 9, 17, 42, 8, 77)]
    ids = torch.tensor([text[:2] + [image] * tokens + text[2:]])
    pixels = torch.randn(1, int(vision["num_channels"]), height, width, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


INTERNVL = register(FamilySpec(
    name="internvl", hf_model_types=("internvl",), hf_layer_prefix="model.language_model.layers.{layer}.",
    first_stage=_reprefixed(FIRST, "model.", "model.language_model."), layer=LANGUAGE_LAYER,
    last_stage=_reprefixed(LAST, "model.", "model.language_model."), hf_config_class="InternVLConfig",
    arch_from_hf_config=arch_from_config, hf_config_from_arch=config_from_arch, matches_megatron=matches_megatron,
    hf_ignored_suffixes=("rotary_emb.inv_freq",), hf_aliases=older_spelling, towers=MINDSPEED_MM.towers,
    megatron_prefix=MINDSPEED_MM.megatron_prefix, logits_inputs=image_and_text, mindspeed_mm=MINDSPEED_MM))
