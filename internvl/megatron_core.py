"""InternVL in megatron-core's LLaVA layout, as Megatron-LM's NVLM example trains it (``--vision-model-type
internvit300M``: ``examples/multimodal/config.py``, ``model.py``, ``nvlm/internvit.py``, ``layer_scaling.py``).

- the vision tower ``model.vision_tower.`` <-> ``vision_model.`` (megatron-core's ``CLIPViTModel`` of subtype
  ``internvit300M``: ``conv1`` with its bias, ``class_token``, ``position_embeddings``, no ``ln_pre`` / ``ln_post``),
  its layers Megatron-LM's ``get_internvit300M_layer_spec``: LayerNorms of their own (``input_layernorm``,
  ``pre_mlp_layernorm``, also under Transformer Engine), q, k and v fused per head as LLaVA's CLIP tower fuses them,
  layer scale ``lambda_1`` / ``lambda_2`` <-> ``ls1`` / ``ls2`` (its ``LayerScalingTransformerLayer``);
- the projector ``model.multi_modal_projector.`` <-> ``vision_projection.encoder.``: LLaVA's MLP with the LayerNorm
  in front fused into ``linear_fc1`` (``layer_norm_weight`` / ``layer_norm_bias``: Megatron-LM builds a normed
  projector with ``get_norm_mlp_module_spec_te``, Transformer Engine's ``LayerNormColumnParallelLinear``);
- megatron-core's ``pixel_shuffle`` (its version 2, scale 0.5) is transformers' ``InternVLModel.pixel_shuffle``.

InternViT-6B (RMSNorm, qk norm, no q/k/v bias: Megatron-LM's ``internvit`` type, 25 heads padded with dummy heads and
a tensor-parallel qk norm) and whatever else megatron-core's model computes otherwise are refused in one line.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from checkpoint_convert.model import BadInputError, ModelArch, Param, Style, Tower, TowerLayout, register
from llava.family import PROJECTOR, VISION_LAYER
from llava.megatron_core import vision_tower_args
from .family import INTERNVL, _vision

# transformers' InternViT layer names for those of CLIP's layer (``llava.family.VISION_LAYER``)
_CLIP_TO_INTERNVIT = (("layer_norm1.", "layernorm_before."), ("layer_norm2.", "layernorm_after."),
                      ("self_attn.out_proj.", "attention.projection_layer."), ("self_attn.", "attention."))
PROJECTOR_EPS = 1e-5  # transformers' InternVLMultiModalProjector: nn.LayerNorm's default


def _internvit_name(name: str) -> str:
    for clip, internvit in _CLIP_TO_INTERNVIT:
        if name.startswith(clip):
            return internvit + name[len(clip):]
    return name


def _positions_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """transformers' ``position_embeddings`` [1, positions, h] -> megatron-core's ``nn.Embedding`` [positions, h]."""
    return tensors[0].reshape(tensors[0].shape[-2:])


def _positions_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [tensor.unsqueeze(0)]


REPLICATED = Style.REPLICATED
VISION_FIRST = (
    Param("conv1.weight", ("embeddings.patch_embeddings.projection.weight",), REPLICATED),
    Param("conv1.bias", ("embeddings.patch_embeddings.projection.bias",), REPLICATED),
    Param("class_token", ("embeddings.cls_token",), REPLICATED),  # [1, 1, h] on both sides
    Param("position_embeddings.weight", ("embeddings.position_embeddings",), REPLICATED, _positions_to_hf,
          _positions_to_megatron),
)
VISION_LAYER_INTERNVIT = (
    *(dataclasses.replace(p, hf=tuple(map(_internvit_name, p.hf))) for p in VISION_LAYER),
    Param("ls1", ("lambda_1",), REPLICATED),
    Param("ls2", ("lambda_2",), REPLICATED),
)
NORMED_PROJECTOR = (
    Param("linear_fc1.layer_norm_weight", ("layer_norm.weight",), REPLICATED),
    Param("linear_fc1.layer_norm_bias", ("layer_norm.bias",), REPLICATED),
    *PROJECTOR,
)
TOWERS = (
    Tower("vision", "model.vision_tower.", "vision_model.", first=VISION_FIRST, layer=VISION_LAYER_INTERNVIT,
          num_layers=lambda arch: int(_vision(arch)["num_hidden_layers"]), hf_layer_prefix="encoder.layer.{layer}.",
          megatron_layer_prefix="decoder.layers.{layer}.", te_fused_norms=False),
    Tower("projector", "model.multi_modal_projector.", "vision_projection.encoder.", first=NORMED_PROJECTOR),
)

# (what transformers' model has, the value megatron-core's internvit300M computes with, why)
_INTERNVIT_300M = (
    ("vision_config.norm_type", "layer_norm", "RMSNorm is InternViT-6B's (Megatron-LM's 'internvit': 25 heads padded "
     "with dummy heads, a tensor-parallel qk norm), not expressed here"),
    ("vision_config.use_qk_norm", False, "internvit300M has no qk norm"),
    ("vision_config.attention_bias", True, "internvit300M's q/k/v are biased"),
    ("vision_config.hidden_act", "gelu", "internvit300M's MLP is gelu"),
    ("vision_config.num_channels", 3, "megatron-core's conv1 takes 3 channels"),
    ("downsample_ratio", 0.5, "megatron-core's pixel shuffle halves each side"),
    ("vision_feature_layer", -1, "megatron-core feeds the projector the last vision layer"),
    ("vision_feature_select_strategy", "default", "the pixel shuffle takes the patches without the class token"),
    ("projector_hidden_act", "gelu", "Megatron-LM's projector is its MLP with gelu"),
)


def _value(arch: ModelArch, field: str) -> Any:
    vision, _, key = field.rpartition(".")
    return (_vision(arch) if vision else arch.extra).get(key)


def megatron_args(arch: ModelArch, tp: int) -> dict[str, Any]:
    """LLaVA's args with InternViT-300M's type, the pixel shuffle, the class token dropped and the projector's
    LayerNorm; refused in one line where megatron-core's model would compute other logits."""
    for field, needed, why in _INTERNVIT_300M:
        if _value(arch, field) != needed:
            raise BadInputError(f"{field} {_value(arch, field)!r}: megatron-core's LLaVA layout (vision model type "
                                f"internvit300M) needs {needed!r}; {why}")
    vision = _vision(arch)
    (height, width), (patch, patch_w) = vision["image_size"], vision["patch_size"]
    if patch != patch_w:
        raise BadInputError(f"vision_config.patch_size {vision['patch_size']}: megatron-core's patches are square")
    return dict(vision_tower_args(arch, tp, int(vision["num_hidden_layers"]), (height, width), patch),
                vision_model_type="internvit300M", disable_vision_class_token=True, pixel_shuffle=True,
                vision_projection_norm="LayerNorm", vision_projection_layernorm_epsilon=PROJECTOR_EPS)


MCORE_LLAVA = TowerLayout(TOWERS, "language_model.", megatron_args=megatron_args)
INTERNVL_MCORE = register(dataclasses.replace(INTERNVL, mcore_vlm=MCORE_LLAVA))
