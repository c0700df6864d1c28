"""OpenGVLab's own InternVL layout (its remote code ``InternVLChatModel``, ``model_type: internvl_chat``), the layout
MindSpeed-MM's converter starts from, read as transformers' ``InternVLForConditionalGeneration``.

Names: ``vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}``,
``vision_model.encoder.layers.N.{norm1, attn.qkv ([q; k; v]), attn.q_norm, attn.k_norm, attn.proj, ls1, norm2, mlp.fc1,
mlp.fc2}``, the projector ``mlp1.{0, 1, 3}`` (LayerNorm, Linear, GELU, Linear), ``language_model.model.*`` and
``language_model.lm_head``; config ``llm_config`` (a Qwen2 or Llama ``architectures``), ``vision_config``
(``intern_vit_6b``: ``qkv_bias``, ``qk_normalization``, ``norm_type``, ``initializer_factor`` the layer scale's
initial value), ``downsample_ratio``, ``select_layer``, ``ps_version``. Its config holds no image token id: the
image token is InternVLConfig's default 151667 (``<IMG_CONTEXT>`` in InternVL 2.5 / 3's Qwen2.5 tokenizers). Output is
written in transformers' layout (the ``-hf`` repositories' form).
"""
from __future__ import annotations

import dataclasses
import re
from functools import partial
from types import SimpleNamespace
from typing import Any, Callable

import torch

from checkpoint_convert.model import BadInputError, ModelArch, register, transformers_attr
from qwen2_vl.family import _plain

from .family import INTERNVL, TEXT_FAMILIES, _as_dict, _single, arch_from_config

LANGUAGE_MODELS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
IMAGE_CONTEXT = 151667
_VISION_FIELDS = {"attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization",
                  "layer_scale_init_value": "initializer_factor"}  # InternVLVisionConfig field -> its name there


def _vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    """InternVLVisionConfig's fields of an ``intern_vit_6b`` vision config."""
    kept = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "norm_type",
            "layer_norm_eps", "hidden_act", "num_channels", "image_size", "patch_size")
    values = {key: vision[key] for key in kept if key in vision}
    values.update({ours: vision[theirs] for ours, theirs in _VISION_FIELDS.items() if theirs in vision})
    config = transformers_attr("InternVLVisionConfig")(**values)
    return {key: value for key, value in _plain(config, "InternVLVisionConfig").items() if key != "dtype"}


def arch_from_original(cfg: Any) -> ModelArch:
    """The architecture as transformers' InternVLConfig describes the same model."""
    if getattr(cfg, "ps_version", "v2") != "v2":
        raise BadInputError(f"ps_version {cfg.ps_version}: transformers' InternVL shuffles pixels as v2 does")
    llm = _as_dict(cfg.llm_config)
    kind = LANGUAGE_MODELS.get((llm.get("architectures") or [None])[0])
    if kind is None:
        raise BadInputError(f"llm_config's architectures {llm.get('architectures')}: an InternVL language model here "
                            f"is {' or '.join(LANGUAGE_MODELS)}")
    text = transformers_attr(TEXT_FAMILIES[kind].hf_config_class)(**{**llm, "model_type": kind}).to_dict()
    vision = _vision_config(_as_dict(cfg.vision_config))
    patches = (vision["image_size"][0] // vision["patch_size"][0]) * (vision["image_size"][1] // vision["patch_size"][1])
    described = SimpleNamespace(
        text_config=text, vision_config=vision, tie_word_embeddings=bool(text.get("tie_word_embeddings")),
        image_token_id=IMAGE_CONTEXT, image_seq_length=int(patches * float(cfg.downsample_ratio) ** 2),
        downsample_ratio=float(cfg.downsample_ratio), projector_hidden_act="gelu",
        vision_feature_layer=int(getattr(cfg, "select_layer", -1)), vision_feature_select_strategy="default")
    return arch_from_config(described).replace(family="internvl_chat")


_VISION_LAYER = r"^vision_model\.encoder\.layers\.(\d+)\."
_RENAMES = tuple((re.compile(pattern), new) for pattern, new in (
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (_VISION_LAYER + r"norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (_VISION_LAYER + r"norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (_VISION_LAYER + r"attn\.(q|k)_norm\.", r"model.vision_tower.encoder.layer.\1.attention.\2_norm."),
    (_VISION_LAYER + r"attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (_VISION_LAYER + r"ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (_VISION_LAYER + r"ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (_VISION_LAYER + r"mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
))
_QKV = re.compile(_VISION_LAYER + r"attn\.qkv\.(weight|bias)$")


def _part(tensors: list[torch.Tensor], index: int) -> torch.Tensor:
    return tensors[0].chunk(3, dim=0)[index]


def original_names(names: list[str]) -> dict[str, tuple[list[str], Callable]]:
    """The original names as aliases of transformers' (its fused ``attn.qkv`` read as q, k and v)."""
    aliases: dict[str, tuple[list[str], Callable]] = {}
    for name in names:
        qkv = _QKV.match(name)
        if qkv:
            for index, part in enumerate("qkv"):
                current = f"model.vision_tower.encoder.layer.{qkv.group(1)}.attention.{part}_proj.{qkv.group(2)}"
                aliases[current] = ([name], partial(_part, index=index))
            continue
        for pattern, new in _RENAMES:
            if pattern.match(name):
                aliases[pattern.sub(new, name)] = ([name], _single)
                break
    return aliases


def _never(arch: ModelArch) -> bool:
    return False  # a Megatron tree is taken for transformers' family


INTERNVL_CHAT = register(dataclasses.replace(
    INTERNVL, name="internvl_chat", hf_model_types=("internvl_chat",), hf_config_class="PreTrainedConfig",
    arch_from_hf_config=arch_from_original, hf_aliases=original_names, matches_megatron=_never))
