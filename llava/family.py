"""LLaVA (transformers' ``LlavaForConditionalGeneration``) in megatron-core's LLaVA layout.

Three towers, named as megatron-core's ``LLaVAModel`` holds them (``models/multimodal/llava_model.py``) and
Megatron-LM's ``tools/checkpoint/saver_llava.py`` writes them:

- the vision tower (``model.vision_tower.`` <-> ``vision_model.``, megatron-core's ``CLIPViTModel``): the patch
  embedding ``conv1``, ``position_embeddings``, CLIP's ``class_token`` and ``ln_pre``, then transformer layers in
  megatron-core's local-spec names (q, k and v fused per head, as ``pack_qkv`` with one group a head);
- the projector (``model.multi_modal_projector.`` <-> ``vision_projection.encoder.``, an MLP: fc1 column, fc2 row);
- the language model under ``language_model.``: Qwen2's layer table (Llama's, with its output-projection bias
  when every linear layer is biased) and Llama's embeddings and head.

megatron-core feeds the projector its vision model's last layer: a ``vision_feature_layer`` of ``-k`` keeps the
vision layers up to that one (the later ones are never used) and is written back as ``-1``. CLIP's
``post_layernorm`` is unused by LLaVA: not stored in Megatron, written back as zeros. A SigLIP tower is converted
between Hugging Face directories only: megatron-core's SigLIP applies ``ln_post`` to the features, which
transformers' LLaVA never does.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch

from checkpoint_convert.model import (BadInputError, FamilySpec, ModelArch, Param, Style, Tower,
                                      every_layer_window_kwargs, pack_qkv, per_layer_window_kwargs, register,
                                      transformers_attr, unpack_qkv)
from llama.family import FIRST, LAST, OUT_BIAS, PRE_MLP_NORM, SELF_ATTENTION, DENSE_MLP, is_llama_like
from llama.hf_config import arch_from_llama_config, config_kwargs

COLUMN, ROW, REPLICATED = Style.COLUMN, Style.ROW, Style.REPLICATED
VISION_CONFIG, TEXT_TYPE, USED_LAYERS = "vision_config", "text_model_type", "vision_layers_used"
KEPT = ("image_token_id", "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias")
OWN_KEYS = (VISION_CONFIG, TEXT_TYPE, USED_LAYERS, *KEPT)
VISION_TYPES = {"clip_vision_model": "CLIPVisionConfig", "siglip_vision_model": "SiglipVisionConfig"}
TEXT_TYPES = ("llama", "mistral", "qwen2")


def _vision(arch: ModelArch) -> dict[str, Any]:
    return arch.extra[VISION_CONFIG]


def _is_clip(arch: ModelArch) -> bool:
    return _vision(arch)["model_type"] == "clip_vision_model"


def _is_siglip(arch: ModelArch) -> bool:
    return not _is_clip(arch)


def _projector_biased(arch: ModelArch) -> bool:
    return bool(arch.extra.get("multimodal_projector_bias", True))


def _heads(arch: ModelArch) -> SimpleNamespace:
    """The vision attention's shape as ``pack_qkv`` reads it: one query group a head."""
    heads = int(_vision(arch)["num_attention_heads"])
    return SimpleNamespace(num_query_groups=heads, heads_per_group=1,
                           kv_channels=int(_vision(arch)["hidden_size"]) // heads)


def _vision_qkv_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    return pack_qkv(*tensors, _heads(arch))


def _vision_qkv_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return unpack_qkv(tensor, _heads(arch))


def _token_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """transformers' class embedding [h] -> megatron-core's ``class_token`` [1, class_token_len, h]."""
    return tensors[0].reshape(1, 1, -1)


def _token_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [tensor.reshape(-1)]


def _vision_width(arch: ModelArch) -> tuple[int, ...]:
    return (int(_vision(arch)["hidden_size"]),)


def _pair(megatron: str, hf: str, style: Style = REPLICATED, bias: Style = REPLICATED, **kwargs: Any) -> tuple:
    return (Param(f"{megatron}.weight", (f"{hf}.weight",), style, **kwargs),
            Param(f"{megatron}.bias", (f"{hf}.bias",), bias, **kwargs))


VISION_FIRST = (
    Param("conv1.weight", ("embeddings.patch_embedding.weight",), REPLICATED),
    Param("conv1.bias", ("embeddings.patch_embedding.bias",), REPLICATED, when=_is_siglip),
    Param("class_token", ("embeddings.class_embedding",), REPLICATED, _token_to_hf, _token_to_megatron,
          when=_is_clip),
    Param("position_embeddings.weight", ("embeddings.position_embedding.weight",), REPLICATED),
    *_pair("ln_pre", "pre_layrnorm", when=_is_clip),
)
VISION_LAYER = (
    *_pair("input_layernorm", "layer_norm1"),
    *(Param(f"self_attention.linear_qkv.{kind}", tuple(f"self_attn.{p}_proj.{kind}" for p in "qkv"), COLUMN,
            _vision_qkv_to_hf, _vision_qkv_to_megatron) for kind in ("weight", "bias")),
    *_pair("self_attention.linear_proj", "self_attn.out_proj", ROW),
    *_pair("pre_mlp_layernorm", "layer_norm2"),
    *_pair("mlp.linear_fc1", "mlp.fc1", COLUMN, COLUMN),
    *_pair("mlp.linear_fc2", "mlp.fc2", ROW),
)
VISION_LAST = (  # CLIP's post-norm is unused by LLaVA (kept on Hugging Face's side only); SigLIP's is ``ln_post``
    *_pair("ln_post", "post_layernorm", when=_is_clip, zero_in_megatron=_vision_width, unused=True),
    *_pair("ln_post", "post_layernorm", when=_is_siglip),
)
PROJECTOR = (
    Param("linear_fc1.weight", ("linear_1.weight",), COLUMN),
    Param("linear_fc1.bias", ("linear_1.bias",), COLUMN, when=_projector_biased),
    Param("linear_fc2.weight", ("linear_2.weight",), ROW),
    Param("linear_fc2.bias", ("linear_2.bias",), REPLICATED, when=_projector_biased),
)


def _used_layers(arch: ModelArch) -> int:
    return int(arch.extra[USED_LAYERS])


TOWERS = (
    Tower("vision", "model.vision_tower.", "vision_model.", first=VISION_FIRST, layer=VISION_LAYER, last=VISION_LAST,
          num_layers=_used_layers, hf_layer_prefix="encoder.layers.{layer}.", megatron_layer_prefix="decoder.layers.{layer}."),
    Tower("projector", "model.multi_modal_projector.", "vision_projection.encoder.", first=PROJECTOR),
)


def _reprefixed(params: tuple[Param, ...]) -> tuple[Param, ...]:
    """Llama's embeddings and final norm, under transformers 5's ``model.language_model.``."""
    return tuple(dataclasses.replace(p, hf=tuple(n.replace("model.", "model.language_model.", 1) for n in p.hf))
                 for p in params)


def _plain(config: Any, config_class: str) -> dict[str, Any]:
    """A sub-config's fields as plain values (its config class's own fields)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {**transformers_attr(config_class).__annotations__, "model_type": None}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items() if key in fields}


def _feature_layers(vision: dict[str, Any], layer: Any) -> int:
    """How many vision layers the features pass through (``vision_feature_layer`` one index of hidden states)."""
    depth = int(vision["num_hidden_layers"])
    if not isinstance(layer, int) or not -depth <= layer <= depth or layer == 0:
        raise BadInputError(f"vision_feature_layer {layer!r}: megatron-core's LLaVA takes one vision layer's output "
                            f"(an index among the {depth} layers), not a list or the embeddings")
    return depth + 1 + layer if layer < 0 else layer


def arch_from_config(cfg: Any) -> ModelArch:
    text, vision = cfg.text_config, cfg.vision_config
    text_type, vision_type = text.model_type, vision.model_type
    if text_type not in TEXT_TYPES or vision_type not in VISION_TYPES:
        raise BadInputError(f"LLaVA with a {vision_type} vision tower and a {text_type} language model: converted "
                            f"here are {', '.join(VISION_TYPES)} with {', '.join(TEXT_TYPES)}")
    tie = bool(getattr(cfg, "tie_word_embeddings", False))  # the tied head is the outer config's (transformers 5)
    text = SimpleNamespace(**{**text.to_dict(), "tie_word_embeddings": tie})
    arch = arch_from_llama_config(text, "llava", ())
    if text_type == "qwen2":  # Qwen2 always biases q, k and v and nothing else
        arch = arch.replace(add_qkv_bias=True, add_bias_linear=False)
    vision_fields = _plain(vision, VISION_TYPES[vision_type])
    extra = {**arch.extra, TEXT_TYPE: text_type, VISION_CONFIG: vision_fields,
             USED_LAYERS: _feature_layers(vision_fields, cfg.vision_feature_layer),
             **{key: getattr(cfg, key) for key in KEPT}}
    return arch.replace(extra=extra)


def _text_config(arch: ModelArch) -> dict[str, Any]:
    text_type = arch.extra[TEXT_TYPE]
    text = config_kwargs(arch.replace(extra={k: v for k, v in arch.extra.items() if k not in OWN_KEYS}))
    if text_type == "qwen2":
        text.update(per_layer_window_kwargs(arch))
    elif text_type == "mistral":
        text.update(every_layer_window_kwargs(arch))
    else:
        text.update(attention_bias=arch.add_qkv_bias, mlp_bias=arch.add_bias_linear)
    return {**text, "model_type": text_type}


def config_from_arch(arch: ModelArch) -> Any:
    """LlavaConfig with the vision layers the features use (``vision_feature_layer`` -1) and no SigLIP head."""
    text = _text_config(arch)
    vision = {**_vision(arch), "num_hidden_layers": _used_layers(arch)}
    if _is_siglip(arch):
        vision["vision_use_head"] = False
    tie = text.pop("tie_word_embeddings")
    return transformers_attr("LlavaConfig")(
        architectures=["LlavaForConditionalGeneration"], text_config=text, vision_config=vision,
        vision_feature_layer=-1, tie_word_embeddings=tie, dtype=text["dtype"],
        **{key: arch.extra[key] for key in KEPT})


def hf_unused(arch: ModelArch, name: str) -> bool:
    """Vision layers after the feature layer, and SigLIP's pooling head: LLaVA never runs them."""
    name = next((new + name[len(old):] for old, new in _STORED if name.startswith(old)), name)  # either spelling
    prefix = "model.vision_tower.encoder.layers."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".")[0]) >= _used_layers(arch)
    return name.startswith("model.vision_tower.head.")


_STORED = (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
           ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


def stored_spelling(names: list[str]) -> dict[str, tuple[list[str], Any]]:
    """The names ``save_pretrained`` writes (and the Hub's LLaVA checkpoints hold: ``vision_tower.*``,
    ``language_model.model.*``) as aliases of the model's own (``model.vision_tower.*``, ...)."""
    aliases = {}
    for name in names:
        old, new = next(((old, new) for old, new in _STORED if name.startswith(old)), (None, None))
        if old is not None:
            aliases[new + name[len(old):]] = ([name], _single)
    return aliases


def _single(tensors: list[Any]) -> Any:
    return tensors[0]


def matches_megatron(arch: ModelArch) -> bool:
    return is_llama_like(arch) and VISION_CONFIG in arch.extra and TEXT_TYPE in arch.extra


def image_and_text(arch: ModelArch) -> dict[str, torch.Tensor]:
    """A fixed image+text input as LLaVA's processor builds one: text, one image token per image feature, text;
    the image's pixels random (seeded)."""
    vision, image = _vision(arch), arch.extra["image_token_id"]
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    features = (size // patch) ** 2 + (int(_is_clip(arch)) if arch.extra["vision_feature_select_strategy"] == "full"
                                       else 0)
    text = [token % min(arch.vocab_size, image) for token in (5, 9, 17, 42, 8, 77)]
    ids = torch.tensor([text[:2] + [image] * features + text[2:]])
    pixels = torch.randn(1, int(vision.get("num_channels", 3)), size, size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


LAYER = SELF_ATTENTION + OUT_BIAS[:1] + PRE_MLP_NORM + DENSE_MLP

LLAVA = register(FamilySpec(
    name="llava", hf_model_types=("llava",), hf_layer_prefix="model.language_model.layers.{layer}.",
    first_stage=_reprefixed(FIRST), layer=LAYER, last_stage=_reprefixed(LAST), hf_config_class="LlavaConfig",
    arch_from_hf_config=arch_from_config, hf_config_from_arch=config_from_arch, matches_megatron=matches_megatron,
    hf_ignored_suffixes=("rotary_emb.inv_freq",), towers=TOWERS, megatron_prefix="language_model.",
    logits_inputs=image_and_text, hf_unused=hf_unused, hf_aliases=stored_spelling))
