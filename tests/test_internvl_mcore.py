"""InternVL in megatron-core's LLaVA layout (vision model type internvit300M, as Megatron-LM's NVLM example trains it):
proof by logits on the family's fixed image+text input (``internvl.family.image_and_text``).

megatron-core's LLaVAModel built on CPU from the args we write (``tests/llava_oracle.py``: its CLIPViTModel of subtype
internvit300M, with stand-ins for Megatron-LM's layer scale and Transformer Engine's normed projector fc1) loads our
rank files strictly at TP 1 and 2 and gives the Hugging Face model's logits; Hugging Face -> Megatron -> Hugging Face
gives the original's; what megatron-core's model cannot express is refused in one line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl.family import INTERNVL, image_and_text
from tests.family_kit import tiny_internvl
from tests.helpers import assert_logits_close, convert
from tests.llava_helpers import as_megatron_lms_args, read_back_with_hf_config
from tests.test_internvl import internvl_logits

ORACLE = Path(__file__).with_name("llava_oracle.py")


@pytest.fixture(scope="module")
def internvit(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The kit's InternViT-300M-shaped InternVL (LayerNorm, biased q/k/v, layer scale) with a tied Qwen2."""
    path = tiny_internvl(tmp_path_factory.mktemp("internvit") / "hf", "qwen2", tie=True)
    return path, internvl_logits(path)


def megatron_logits(source: Path, ckpt: Path, tp: int, work: Path) -> torch.Tensor:
    """megatron-core's logits on the family's input, whose image tokens become one: LLaVAModel expands it into the
    image's features."""
    import transformers
    arch = INTERNVL.arch_from_hf_config(transformers.AutoConfig.from_pretrained(source))
    given, image = image_and_text(arch), int(arch.extra["image_token_id"])
    ids = given["input_ids"][0].tolist()
    first = ids.index(image)
    torch.save({"ids": torch.tensor([ids[:first + 1] + [t for t in ids[first:] if t != image]]),
                "pixels": given["pixel_values"]}, work / "inputs.pt")
    result = subprocess.run([sys.executable, str(ORACLE), str(ckpt), str(work / "inputs.pt"), str(work / "out.pt"),
                             str(tp), "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "out.pt")


@pytest.mark.parametrize("tp, ckpt_format", [(1, "torch"), (2, "torch"), (2, "torch_dist")])
def test_megatron_core_llava_with_internvit_loads_our_checkpoints_and_gives_the_logits(tmp_path, internvit, tp,
                                                                                       ckpt_format):
    """Rank files loaded with ``load_state_dict(strict=True)``; ``torch_dist`` through megatron-core's
    ``dist_checkpointing.load`` (strict: every key asked for, none left over)."""
    source, original = internvit
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron", "--transformer_impl",
                   "local", "--target_tensor_model_parallel_size", str(tp), "--megatron_ckpt_format", ckpt_format) == 0
    if ckpt_format == "torch":
        args = torch.load(tmp_path / "m" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
        assert (args.vision_model_type, args.img_h, args.patch_dim, args.disable_vision_class_token,
                args.pixel_shuffle) == ("internvit300M", 16, 4, True, True)
    logits = megatron_logits(source, tmp_path / "m", tp, tmp_path)
    print(f"max logit difference, megatron-core at TP{tp} ({ckpt_format}): {(logits - original).abs().max().item():.2e}")
    assert_logits_close(logits, original, atol=2e-5)


def test_te_rank_files_keep_internvits_norms_and_convert_back_through_mindspeed_mm(tmp_path, internvit):
    """Under Transformer Engine, Megatron-LM's InternViT-300M layer keeps its LayerNorms as modules of their own (its
    ``get_internvit300M_layer_spec``: LNImpl, not fused into linear_qkv / linear_fc1); megatron-core's layout at TP2 x
    PP2 -> MindSpeed-MM's -> megatron-core's at TP1 -> Hugging Face gives the original's logits."""
    source, original = internvit
    assert convert("--load_path", source, "--save_path", tmp_path / "te", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    first = torch.load(tmp_path / "te" / "release" / "mp_rank_01_000" / "model_optim_rng.pt", weights_only=False)
    layer = "vision_model.decoder.layers.1."
    assert {f"{layer}input_layernorm.bias", f"{layer}pre_mlp_layernorm.weight", f"{layer}ls1", f"{layer}ls2",
            "vision_projection.encoder.linear_fc1.layer_norm_weight", "vision_model.conv1.bias"} <= set(first["model"])
    assert not any("layer_norm" in name for name in first["model"] if name.startswith("vision_model."))
    assert first["model"]["vision_model.position_embeddings.weight"].shape == (17, 32)  # 16 patches + class token
    hf_config = ("--hf_config_dir", str(source))
    assert convert("--load_path", tmp_path / "te", "--save_path", tmp_path / "mm", "--to", "megatron",
                   "--megatron_format", "mindspeed_mm") == 0
    assert convert("--load_path", tmp_path / "mm", "--save_path", tmp_path / "tp1", "--to", "megatron",
                   "--megatron_format", "mcore", "--target_tensor_model_parallel_size", "1", *hf_config) == 0
    assert convert("--load_path", tmp_path / "tp1", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(internvl_logits(tmp_path / "back"), original)


def test_rank_files_with_megatron_lms_own_args_read_with_the_hugging_face_config(tmp_path, internvit, capsys):
    """Megatron-LM's training writes args naming ``vision_model_type`` internvit300M and no Hugging Face config: read
    with ``--hf_config_dir``."""
    source, original = internvit
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron") == 0
    as_megatron_lms_args(tmp_path / "m")
    read_back_with_hf_config(tmp_path / "m", tmp_path / "back", source, capsys)
    assert_logits_close(internvl_logits(tmp_path / "back"), original)


def _outer(**values):
    """A built model's config.json with InternVLConfig's own fields changed."""
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **values}))
    return edit


@pytest.mark.parametrize("vision, edit, message", [
    (dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True), None, "norm_type 'rms_norm'"),  # 6B-style
    (dict(use_qk_norm=True), None, "use_qk_norm True"),
    (dict(attention_bias=False), None, "attention_bias False"),
    (dict(hidden_act="gelu_pytorch_tanh"), None, "hidden_act 'gelu_pytorch_tanh'"),
    ({}, _outer(vision_feature_layer=-2), "vision_feature_layer -2"),
    ({}, _outer(vision_feature_select_strategy="full"), "vision_feature_select_strategy 'full'"),
])
def test_what_megatron_cores_internvit_cannot_express_is_refused_in_one_line(tmp_path, capsys, vision, edit, message):
    source = tiny_internvl(tmp_path / "hf", "qwen2", **vision)
    if edit:
        edit(source)
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron") != 0
    err = capsys.readouterr().err
    assert message in err and "internvit300M" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()
