"""LLaVA in megatron-core's LLaVA layout (``FamilySpec.mcore_vlm``): the args Megatron-LM's multimodal training reads
beside the towers' tables of ``family.py``, and what that layout cannot express, refused in one line."""
from __future__ import annotations

import dataclasses
from typing import Any

from checkpoint_convert.model import BadInputError, ModelArch, TowerLayout, register

from .family import LLAVA, TEXT_TYPE, TOWERS, _is_siglip, _used_layers, _vision

# ---- megatron-core's LLaVA layout: the args Megatron-LM's multimodal training reads (examples/multimodal's
# ``model.py`` and ``multimodal_args.py``, ``saver_llava``'s ``_maybe_parse_additional_megatron_args``)

# Megatron-LM's multimodal example (``examples/multimodal/config.py``, tag core_v0.17.1) knows a language model by name
# and fixes its MLP and projector by it. transformers' projector is vision -> hidden -> hidden with gelu and no norm;
# of its names only "mistral_7b" has no projector norm (its projector and MLP widths are 14336), so a transformers LLaVA
# fits it only at hidden size 14336 (qwen2.5_7B's projector is 3584 wide but RMS-normed; the rest are normed or wider).
# Other models get ``hf_<type>``: megatron-core's LLaVAModel holds them, Megatron-LM's example code does not.
MEGATRON_LM_LANGUAGE = {("mistral", 14336, 14336): "mistral_7b", ("llama", 14336, 14336): "mistral_7b"}


def language_model_type(arch: ModelArch) -> str:
    text = arch.extra[TEXT_TYPE]
    return MEGATRON_LM_LANGUAGE.get((text, arch.hidden_size, arch.ffn_hidden_size), f"hf_{text}")


def megatron_args(arch: ModelArch, tp: int) -> dict[str, Any]:
    """Vision model type, image and patch size, class token, projector; refused where megatron-core differs."""
    vision = _vision(arch)
    if _is_siglip(arch):
        raise BadInputError("a LLaVA with a SigLIP vision tower has no megatron-core form: megatron-core's SigLIP "
                            "applies ln_post to the image features, transformers' LLaVA never applies post_layernorm")
    if arch.extra["projector_hidden_act"] != "gelu":
        raise BadInputError(f"projector_hidden_act '{arch.extra['projector_hidden_act']}': megatron-core's LLaVA "
                            "projector here is Megatron-LM's MLP with gelu")
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    return dict(vision_tower_args(arch, tp, _used_layers(arch), (size, size), patch), vision_model_type="clip",
                language_model_type=language_model_type(arch),
                disable_vision_class_token=arch.extra["vision_feature_select_strategy"] == "default",
                pixel_shuffle=False)


def vision_tower_args(arch: ModelArch, tp: int, layers: int, image: tuple[int, int], patch: int) -> dict[str, Any]:
    """The args of a single-tile image through one of megatron-core's ViTs (its sizes as our own ``vision_*`` args:
    Megatron-LM's training fixes them per vision model type), an MLP projector and a language model of our
    ``hf_<model_type>``; refused when tensor parallelism does not divide what it splits."""
    vision = _vision(arch)
    heads = int(vision["num_attention_heads"])
    for what, count in (("vision attention heads", heads), ("vision MLP width", int(vision["intermediate_size"])),
                        ("projector width", arch.hidden_size)):
        if count % tp:
            raise BadInputError(f"tensor parallel size {tp} does not divide the {count} {what}")
    return dict(language_model_type=f"hf_{arch.extra[TEXT_TYPE]}", img_h=image[0], img_w=image[1], patch_dim=patch,
                class_token_len=1, vision_projection_type="mlp", image_token_index=arch.extra["image_token_id"],
                vision_num_layers=layers, vision_hidden_size=int(vision["hidden_size"]),
                vision_num_attention_heads=heads, vision_ffn_hidden_size=int(vision["intermediate_size"]),
                vision_layernorm_epsilon=float(vision["layer_norm_eps"]), vision_activation=vision["hidden_act"],
                max_num_tiles=1, use_tiling=False, use_tile_tags=False, num_frames=1, use_thumbnail=False)


LLAVA_MCORE = register(dataclasses.replace(LLAVA, mcore_vlm=TowerLayout(TOWERS, "language_model.",
                                                                        megatron_args=megatron_args)))
