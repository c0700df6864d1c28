"""Tiny LLaVA models (CLIP or SigLIP vision tower; Llama, Mistral or Qwen2 language model) and their logits on a fixed
image+text input (pixels from a seeded generator): shared by the LLaVA tests and megatron-core's LLaVA oracle."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE = 120  # image_token_id, inside the vocabulary
IMAGE_SIZE, PATCH = 28, 7  # 16 patches
VISION = {"clip_vision_model": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu"),
          "siglip_vision_model": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)}
TEXT = {"llama": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128),
        "qwen2": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, rope_theta=1e6),
        "mistral": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, sliding_window=None)}


def tiny_llava(path: Path, vision: str = "clip_vision_model", text: str = "llama", tie: bool = False,
               feature_layer: int = -2, strategy: str = "default", vision_sizes: dict | None = None,
               text_sizes: dict | None = None) -> Path:
    """``vision_sizes`` / ``text_sizes``: config values over the defaults."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config={"model_type": vision, **VISION[vision], **(vision_sizes or {})},
        text_config={"model_type": text, **TEXT[text], **(text_sizes or {})},
        image_token_id=IMAGE, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():  # norms away from 1 and biases away from 0: a swapped tensor shows
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    return path


def features(strategy: str = "default", vision: str = "clip_vision_model") -> int:
    """Image features per image: one a patch, and CLIP's class token with the ``full`` strategy."""
    return (IMAGE_SIZE // PATCH) ** 2 + int(strategy == "full" and vision == "clip_vision_model")


def llava_inputs(strategy: str = "default", vision: str = "clip_vision_model") -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 9] + [IMAGE] * features(strategy, vision) + [17, 42, 8, 77]])
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


def llava_logits(path: Path, strategy: str = "default", vision: str = "clip_vision_model") -> torch.Tensor:
    import transformers
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**llava_inputs(strategy, vision)).logits.float()


def as_megatron_lms_args(tree: Path) -> None:
    """Our rank files' args as Megatron-LM's multimodal training writes them: naming ``vision_model_type`` but no
    Hugging Face config, image token id or vision sizes (its examples fix those per vision model type)."""
    import argparse
    files = sorted((tree / "release").glob("mp_rank_*/model_optim_rng.pt"))
    ours = {"hf_extra_config", "hf_family", "image_token_index"} | {
        name for name in vars(torch.load(files[0], weights_only=False)["args"]) if name.startswith("vision_") and
        name not in ("vision_model_type", "vision_projection_type")}
    for file in files:
        state = torch.load(file, weights_only=False)
        state["args"] = argparse.Namespace(**{k: v for k, v in vars(state["args"]).items() if k not in ours})
        torch.save(state, file)


def read_back_with_hf_config(tree: Path, out: Path, source: Path, capsys) -> Path:
    """Such rank files to Hugging Face: refused without ``--hf_config_dir``, converted with it."""
    from tests.helpers import convert
    capsys.readouterr()
    assert convert("--load_path", tree, "--save_path", out.with_name("refused"), "--to", "hf") != 0
    assert "--hf_config_dir" in capsys.readouterr().err
    assert convert("--load_path", tree, "--save_path", out, "--to", "hf", "--hf_config_dir", source) == 0
    return out
