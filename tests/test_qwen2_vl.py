"""Qwen2.5-VL and Qwen2-VL: a vision tower, its merger and a language model with multimodal rotary embeddings.

Proof by logits on a fixed image+text input (pixel values and image_grid_thw built here): the Hugging Face model
after each round trip, and megatron-core's GPTModel (mrope) loaded strictly from the language model's tensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import assert_logits_close, assert_reports_read, convert

IMAGE, VIDEO, START, END = 100, 101, 102, 103
GRID = torch.tensor([[1, 4, 4]])  # one image of 4 x 4 patches: 4 tokens after the 2 x 2 merge
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
VISION = {"qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                             patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                             fullatt_block_indexes=[1]),
          "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2)}
CLASSES = {"qwen2_5_vl": "Qwen2_5_VL", "qwen2_vl": "Qwen2VL"}


def tiny_vl(family: str, path: Path, tie: bool = False, **vision: Any) -> Path:
    """A tiny model of the family; ``vision`` changes its vision config's values."""
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, f"{CLASSES[family]}Config")(
        text_config=TEXT, vision_config={**VISION[family], **vision}, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=tie)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for param in model.parameters():  # norms away from 1 and biases away from 0: a swapped tensor shows
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    return path


def vl_inputs() -> dict[str, torch.Tensor]:
    """Text, an image's 4 placeholder tokens between its start and end tokens, more text; its 16 patches."""
    ids = [5, 9, START] + [IMAGE] * 4 + [END, 17, 42, 8, 77]
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(int(GRID.prod()), 3 * 2 * 4 * 4, generator=generator)
    ids = torch.tensor([ids])
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": GRID,
            "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE).int()}  # text 0, image 1


def vl_logits(path: Path) -> torch.Tensor:
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**vl_inputs()).logits.float()


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    path = tiny_vl("qwen2_5_vl", tmp_path_factory.mktemp("vl") / "hf")
    return path, vl_logits(path)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def qwen25_variant(request, qwen25, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    if not request.param:
        return qwen25
    path = tiny_vl("qwen2_5_vl", tmp_path_factory.mktemp("vl_tied") / "hf", tie=True)
    return path, vl_logits(path)


def test_bridge_round_trip_and_reshape_give_the_original_logits(tmp_path, qwen25_variant):
    source, original = qwen25_variant
    tied = json.loads((source / "config.json").read_text())["tie_word_embeddings"]
    assert convert("--load_path", source, "--save_path", tmp_path / "bridge", "--to", "megatron",
                   "--megatron_bridge") == 0
    iter_dir = tmp_path / "bridge" / "iter_0000000"
    model = yaml.safe_load((iter_dir / "run_config.yaml").read_text())["model"]
    assert model["_target_"].endswith("qwen25_vl_provider.Qwen25VLModelProvider")
    assert model["position_embedding_type"] == "mrope" and model["mrope_section"] == [2, 3, 3]
    assert model["vision_config"]["depth"] == 2 and model["image_token_id"] == IMAGE
    assert model["share_embeddings_and_output_weights"] == tied
    assert convert("--load_path", tmp_path / "bridge", "--save_path", tmp_path / "tp2pp2", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    model = yaml.safe_load((tmp_path / "tp2pp2" / "iter_0000000" / "run_config.yaml").read_text())["model"]
    assert model["tensor_model_parallel_size"] == 2 and model["pipeline_model_parallel_size"] == 2
    assert convert("--load_path", tmp_path / "tp2pp2", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(vl_logits(tmp_path / "back"), original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert config["vision_config"]["fullatt_block_indexes"] == [1] and config["video_token_id"] == VIDEO
    assert config["tie_word_embeddings"] == tied


def language_model_inputs(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What the Hugging Face model hands its language model on the image+text input (input embeddings with the
    merged image features scattered in, 3-D position ids from its own get_rope_index), and its logits."""
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    seen = {}

    def capture(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])
    model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    inputs = vl_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=GRID, attention_mask=inputs["attention_mask"])
    assert torch.equal(seen["positions"][-3:], positions)  # temporal, height, width (after a text row if any)
    assert not torch.equal(positions[1], positions[2]), "the image must give the rows different positions"
    return {"ids": inputs["input_ids"], "embeds": seen["embeds"], "positions": positions}, logits


MINDSPEED_MM_TP2_PP2 = ["--megatron_format", "mindspeed_mm", "--target_tensor_model_parallel_size", "2",
                        "--target_pipeline_layers", "1,3", "--vision_pipeline_layers", "2,0"]


@pytest.mark.parametrize("family, layout", [("qwen2_5_vl", ["--megatron_bridge"]), ("qwen2_vl", MINDSPEED_MM_TP2_PP2)],
                         ids=["bridge", "mindspeed_mm"])
def test_megatron_core_mrope_gpt_model_at_tp2_pp2_loads_the_language_model(tmp_path, qwen25, family, layout):
    """Megatron-Bridge's torch_dist loaded at TP2 x PP2 by dist_checkpointing; MindSpeed-MM's TP2 x PP2 (language 1,3)
    rank files, each rank its own file's text_decoder.* tensors."""
    source = qwen25[0] if family == "qwen2_5_vl" else tiny_vl(family, tmp_path / "hf")
    inputs, original = language_model_inputs(source)
    assert convert("--load_path", source, "--save_path", tmp_path / "megatron", "--to", "megatron", *layout) == 0
    torch.save(inputs, tmp_path / "inputs.pt")
    oracle = Path(__file__).with_name("megatron_oracle.py")
    config = [str(source)] if "mindspeed_mm" in layout else []
    subprocess.run([sys.executable, str(oracle), "vl-logits", str(tmp_path / "megatron"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "logits.pt"), "2", "2", *config], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_logits_close(torch.load(tmp_path / "logits.pt"), original, atol=2e-5)


def test_both_key_spellings_convert_to_the_original_logits(tmp_path, qwen25):
    """transformers' save_pretrained (5.25 as 4.x) stores ``model.layers.*`` and ``visual.*``, the fixture's spelling;
    the model's own names are ``model.language_model.*`` and ``model.visual.*``: read both."""
    source, original = qwen25
    assert "visual.merger.mlp.0.weight" in load_file(source / "model.safetensors")
    older = tmp_path / "current"
    older.mkdir()
    for name in ("config.json", "generation_config.json"):
        (older / name).write_bytes((source / name).read_bytes())
    tensors = load_file(source / "model.safetensors")
    renamed = {("model." + name if name.startswith("visual.") else name.replace("model.", "model.language_model.", 1)):
               tensor for name, tensor in tensors.items()}
    save_file(renamed, older / "model.safetensors")
    assert convert("--load_path", older, "--save_path", tmp_path / "bridge", "--to", "megatron",
                   "--megatron_bridge") == 0
    assert convert("--load_path", tmp_path / "bridge", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(vl_logits(tmp_path / "back"), original)


@pytest.mark.parametrize("family, flags, message", [
    ("qwen2_5_vl", ["--megatron_ckpt_format", "torch"], "--megatron_bridge or --megatron_format mindspeed_mm"),
    ("qwen2_vl", ["--megatron_bridge"], "no Megatron-Bridge release has a Qwen2-VL provider"),
    ("qwen2_vl", [], "holds them: --megatron_format mindspeed_mm"),
])
def test_layouts_that_cannot_hold_the_model_are_refused_in_one_line(tmp_path, capsys, family, flags, message):
    source = tiny_vl(family, tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bars
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "megatron", *flags) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists()
    if family == "qwen2_vl":  # the layout that holds it
        assert err[0].endswith("--megatron_format mindspeed_mm" + (" instead" if flags else "")), err


def test_inspect_verify_and_dry_run_read_the_bridge_output(tmp_path, qwen25, capsys):
    """verify --logits feeds an image and text (a vision tower that differs changes the logits it reports)."""
    from checkpoint_convert.commands.report_cli import run_verify_cli
    source, _ = qwen25
    assert convert("--load_path", source, "--save_path", tmp_path / "bridge", "--to", "megatron",
                   "--megatron_bridge") == 0
    assert_reports_read(source, tmp_path / "bridge", "qwen2_5_vl", capsys)
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("config.json", "generation_config.json"):
        (changed / name).write_bytes((source / name).read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors["visual.blocks.0.attn.qkv.weight"] = tensors["visual.blocks.0.attn.qkv.weight"] * 1.5
    save_file(tensors, changed / "model.safetensors")
    capsys.readouterr()
    assert run_verify_cli([str(changed), str(tmp_path / "bridge"), "--logits", "--atol", "10"]) == 0
    logits_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("logits"))
    assert float(logits_line.split()[-1]) > 1e-4, logits_line


def test_mrope_sections_that_do_not_fill_the_heads_are_refused(tmp_path, qwen25, capsys):
    """Megatron-Bridge 0.6.2's own import writes its provider's default [16, 24, 24] whatever the head size."""
    source, _ = qwen25
    assert convert("--load_path", source, "--save_path", tmp_path / "bridge", "--to", "megatron",
                   "--megatron_bridge") == 0
    run_config = tmp_path / "bridge" / "iter_0000000" / "run_config.yaml"
    config = yaml.safe_load(run_config.read_text())
    config["model"]["mrope_section"] = [16, 24, 24]
    run_config.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert convert("--load_path", tmp_path / "bridge", "--save_path", tmp_path / "hf", "--to", "hf") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run_config.yaml: mrope_section [16, 24, 24] covers 64 rotary pairs" in err[0], err
