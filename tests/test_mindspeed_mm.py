"""Qwen2.5-VL and Qwen2-VL in MindSpeed-MM's layout (Ascend/MindSpeed-MM ``checkpoint/vlm_model/converters/
qwen2_5vl.py``, ``qwen2vl.py``): rank files holding ``{'model', 'checkpoint_version'}``, the vision tower under
``image_encoder.`` in megatron-core form, the language model under ``text_decoder.``; every tower split over pipeline
ranks on its own.

Proof by logits: the Hugging Face model on the fixed image+text input gives the original's logits after each trip.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_logits_close, convert
from tests.test_qwen2_vl import tiny_vl, vl_logits

HEADS, VISION_HIDDEN = 2, 32  # the tiny vision towers' (tests/test_qwen2_vl.py)
FAMILIES = ("qwen2_5_vl", "qwen2_vl")


@pytest.fixture(scope="module")
def vl_models(tmp_path_factory):
    """A tiny model of each family and its logits, built once for the module when a test first asks for it."""
    built: dict[str, tuple[Path, torch.Tensor]] = {}

    def model(family: str) -> tuple[Path, torch.Tensor]:
        if family not in built:
            path = tiny_vl(family, tmp_path_factory.mktemp(family) / "hf")
            built[family] = path, vl_logits(path)
        return built[family]
    return model


@pytest.fixture(scope="module")
def qwen25(vl_models) -> tuple[Path, torch.Tensor]:
    return vl_models("qwen2_5_vl")


def rank_file(root: Path, name: str) -> dict:
    return torch.load(root / "release" / name / "model_optim_rng.pt", weights_only=True)


def tp_rank(root: Path, tp: int) -> dict:
    """The ``model`` dicts of one tensor-parallel rank's files on every pipeline rank, in one dict (the vision
    tower's keys are unique to their rank when it sits on one)."""
    names = sorted(p.name for p in (root / "release").iterdir() if p.name.startswith(f"mp_rank_{tp:02d}"))
    return {key: value for name in names for key, value in rank_file(root, name)["model"].items()}


def to_hf(tmp_path: Path, mm: Path, source: Path, *flags: str) -> Path:
    back = tmp_path / f"back_{mm.name}"
    assert convert("--load_path", mm, "--save_path", back, "--to", "hf", "--hf_config_dir", source, *flags) == 0
    return back


def _fc1_on_rank_1(hf: dict, family: str) -> torch.Tensor:
    """The second half of the vision MLP's first layer: Qwen2.5-VL's gate and up fused, each split across the ranks
    (MindSpeed-MM's UpGateMergeOp and GLUSplit); Qwen2-VL's fc1 split by rows (its rename fc -> linear_fc, RowSplit)."""
    if family == "qwen2_vl":
        fc1 = hf["visual.blocks.1.mlp.fc1.weight"]
        return fc1[fc1.shape[0] // 2:]
    gate, up = (hf[f"visual.blocks.1.mlp.{part}_proj.weight"] for part in ("gate", "up"))
    rows = gate.shape[0] // 2
    return torch.cat([gate[rows:], up[rows:]])


@pytest.mark.parametrize("family, pipeline", [
    ("qwen2_5_vl", []),
    ("qwen2_vl", ["--vision_pipeline_layers", "2,0", "--target_pipeline_layers", "1,3"]),
])
def test_hf_to_mindspeed_mm_tp2_and_back_gives_the_original_logits(tmp_path, vl_models, family, pipeline):
    source, original = vl_models(family)
    mm = tmp_path / "mm"
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   "--target_tensor_model_parallel_size", "2", *pipeline) == 0
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    files = [torch.load(file, weights_only=True) for file in sorted((mm / "release").glob("*/model_optim_rng.pt"))]
    assert len(files) == 2 * (2 if pipeline else 1)
    assert all(set(state) == {"model", "checkpoint_version"} and state["checkpoint_version"] == 3.0 for state in files)
    model, second = tp_rank(mm, 0), tp_rank(mm, 1)
    assert {"image_encoder.encoder.patch_embed.proj.weight", "image_encoder.projector.layernorm.weight",
            "image_encoder.projector.encoder.linear_fc1.weight", "text_decoder.embedding.word_embeddings.weight",
            "text_decoder.decoder.layers.0.self_attention.linear_qkv.bias", "text_decoder.output_layer.weight",
            "image_encoder.encoder.blocks.layers.1.mlp.linear_fc1.bias"} <= set(model)
    hf = load_file(source / "model.safetensors")  # the older spelling
    if family == "qwen2_vl":  # LayerNorms with biases whole on every rank, fc1's bias split by rows, fc2 by columns
        mlp = "image_encoder.encoder.blocks.layers.1.mlp."
        assert torch.equal(second["image_encoder.encoder.blocks.layers.1.input_layernorm.bias"],
                           hf["visual.blocks.1.norm1.bias"])
        assert torch.equal(second["image_encoder.projector.layernorm.bias"], hf["visual.merger.ln_q.bias"])
        assert torch.equal(second[mlp + "linear_fc1.bias"], hf["visual.blocks.1.mlp.fc1.bias"].chunk(2)[1])
        assert torch.equal(second[mlp + "linear_fc2.weight"], hf["visual.blocks.1.mlp.fc2.weight"].chunk(2, dim=1)[1])
        assert not any(key.startswith("image_encoder.") for key in rank_file(mm, "mp_rank_00_001")["model"])
    # the vision qkv interleaved per head ([q_h, k_h, v_h]), one head on each TP rank (MindSpeed-MM's RelocateOp)
    head = VISION_HIDDEN // HEADS
    q, k, v = hf["visual.blocks.0.attn.qkv.weight"].split(VISION_HIDDEN)
    expected = torch.cat([q[head:], k[head:], v[head:]])
    assert torch.equal(second["image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"], expected)
    fc1 = second["image_encoder.encoder.blocks.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, _fc1_on_rank_1(hf, family))
    assert model["text_decoder.embedding.word_embeddings.weight"].shape[0] == 64  # 128 split unpadded
    assert_logits_close(vl_logits(to_hf(tmp_path, mm, source)), original)


@pytest.mark.parametrize("family", FAMILIES)
def test_reshape_with_separate_vision_and_language_splits_gives_the_original_logits(tmp_path, vl_models, family):
    """TP1 -> TP2 with the vision tower 2,0 and the language model 1,3 over two pipeline ranks, and back to HF."""
    source, original = vl_models(family)
    mm = tmp_path / "tp1"
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format",
                   "mindspeed_mm") == 0
    assert sorted(p.name for p in (mm / "release").iterdir() if p.is_dir()) == ["mp_rank_00"]
    split = tmp_path / "pp2"
    assert convert("--load_path", mm, "--save_path", split, "--to", "megatron", "--hf_config_dir", source,
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_layers", "1,3",
                   "--vision_pipeline_layers", "2,0") == 0
    first, last = rank_file(split, "mp_rank_00_000")["model"], rank_file(split, "mp_rank_01_001")["model"]
    assert {"image_encoder.encoder.blocks.layers.1.input_layernorm.weight", "image_encoder.projector.layernorm.weight",
            "text_decoder.embedding.word_embeddings.weight", "text_decoder.decoder.layers.0.input_layernorm.weight"} \
        <= set(first) and "text_decoder.decoder.layers.1.input_layernorm.weight" not in first
    assert not any(key.startswith("image_encoder.") for key in last)
    assert {"text_decoder.decoder.layers.2.mlp.linear_fc1.weight", "text_decoder.decoder.final_layernorm.weight",
            "text_decoder.output_layer.weight"} <= set(last)
    assert_logits_close(vl_logits(to_hf(tmp_path, split, source)), original)
    kept = tmp_path / "kept"  # the pipeline kept: both splits are the source's, counted from its files
    assert convert("--load_path", split, "--save_path", kept, "--to", "megatron", "--hf_config_dir", source,
                   "--target_tensor_model_parallel_size", "1") == 0
    assert set(rank_file(kept, "mp_rank_00_000")["model"]) == set(first)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_copy_the_word_embeddings_to_the_last_rank(tmp_path, capsys, family):
    """MindSpeed-MM's TieOp: with a pipeline, the last language rank holds output_layer.weight, the embeddings."""
    source = tiny_vl(family, tmp_path / "hf", tie=True)
    original = vl_logits(source)
    mm = tmp_path / "mm"
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   "--target_pipeline_layers", "2,2", "--vision_pipeline_layers", "1,1", "--dry_run") == 0
    assert "mindspeed-mm torch" in capsys.readouterr().out and not mm.exists()
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   "--target_pipeline_layers", "2,2", "--vision_pipeline_layers", "1,1") == 0
    first, last = rank_file(mm, "mp_rank_00_000")["model"], rank_file(mm, "mp_rank_00_001")["model"]
    assert torch.equal(last["text_decoder.output_layer.weight"], first["text_decoder.embedding.word_embeddings.weight"])
    assert "image_encoder.projector.layernorm.weight" in last and "image_encoder.encoder.patch_embed.proj.weight" \
        in first
    assert_logits_close(vl_logits(to_hf(tmp_path, mm, source)), original)


@pytest.mark.parametrize("flags, message", [
    (["--hf_config_dir", "{missing}"], "pass --hf_config_dir"),
    ([], "pass --hf_config_dir"),
])
def test_reading_without_the_config_is_refused_in_one_line(tmp_path, qwen25, capsys, flags, message):
    source, _ = qwen25
    mm = tmp_path / "mm"
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format",
                   "mindspeed_mm") == 0
    capsys.readouterr()
    flags = [flag.format(missing=tmp_path / "nowhere") for flag in flags]
    assert convert("--load_path", mm, "--save_path", tmp_path / "hf", "--to", "hf", *flags) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("flags, message", [
    (["--vision_pipeline_layers", "1,0", "--target_pipeline_layers", "2,2"], "sum to the 2 layers of the vision"),
    (["--vision_pipeline_layers", "2"], "needs --megatron_format mindspeed_mm"),
])
def test_vision_splits_that_do_not_fit_are_refused_in_one_line(tmp_path, qwen25, capsys, flags, message):
    source, _ = qwen25
    layout = ["--megatron_format", "mindspeed_mm"] if "1,0" in flags else ["--megatron_bridge"]
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "megatron", *layout, *flags) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, vision, message", [
    ("qwen2_vl", {"num_heads": 1}, "tensor parallel size 2 does not divide the 1 vision attention heads"),
    ("qwen2_5_vl", {"intermediate_size": 49}, "tensor parallel size 2 does not divide the 49 vision MLP width"),
])
def test_vision_sizes_the_tp_size_does_not_divide_are_refused_in_one_line(tmp_path, capsys, family, vision, message):
    """MindSpeed-MM splits the vision heads and MLP over the TP ranks: a size TP does not divide is refused before
    anything is written (the language model's sizes are divisible here)."""
    source = tiny_vl(family, tmp_path / "hf", **vision)
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "megatron", "--megatron_format",
                   "mindspeed_mm", "--target_tensor_model_parallel_size", "2") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists()


def test_reshape_between_megatron_bridge_and_mindspeed_mm_gives_the_original_logits(tmp_path, qwen25):
    """Both layouts of the family: Megatron-Bridge -> MindSpeed-MM at TP2 with vision 2,0 and language 1,3, and that
    back to Megatron-Bridge at TP1 PP2; the Hugging Face model of the result gives the original's logits."""
    import yaml
    source, original = qwen25
    bridge = tmp_path / "bridge"
    assert convert("--load_path", source, "--save_path", bridge, "--to", "megatron", "--megatron_bridge") == 0
    mm = tmp_path / "mm"
    assert convert("--load_path", bridge, "--save_path", mm, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_layers", "1,3",
                   "--vision_pipeline_layers", "2,0") == 0
    assert "image_encoder.projector.encoder.linear_fc2.weight" in rank_file(mm, "mp_rank_01_000")["model"]
    again = tmp_path / "bridge_again"
    assert convert("--load_path", mm, "--save_path", again, "--to", "megatron", "--megatron_bridge",
                   "--hf_config_dir", source, "--target_tensor_model_parallel_size", "1") == 0
    model = yaml.safe_load((again / "iter_0000000" / "run_config.yaml").read_text())["model"]
    assert model["_target_"].endswith("Qwen25VLModelProvider") and model["pipeline_model_parallel_size"] == 2
    back = tmp_path / "back"
    assert convert("--load_path", again, "--save_path", back, "--to", "hf") == 0
    assert_logits_close(vl_logits(back), original)


def test_verify_logits_reads_mindspeed_mm_rank_files(tmp_path, qwen25, capsys):
    """verify --logits feeds both models the image and text; a vision tensor that differs shows in the logits."""
    from checkpoint_convert.commands.report_cli import run_verify_cli
    source, _ = qwen25
    mm = tmp_path / "mm"
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   "--target_tensor_model_parallel_size", "2") == 0
    capsys.readouterr()
    assert run_verify_cli([str(source), str(mm), "--logits", "--hf_config_dir", str(source)]) == 0
    assert "logits: max |diff| 0" in capsys.readouterr().out
    file = mm / "release" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=True)
    state["model"]["image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"] *= 1.5
    torch.save(state, file)
    assert run_verify_cli([str(source), str(mm), "--logits", "--atol", "10", "--hf_config_dir", str(source)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("logits"))
    assert float(line.split()[-1]) > 1e-4, line


def test_inspect_shows_both_towers_their_splits_and_tp(tmp_path, vl_models, capsys):
    """inspect reads a MindSpeed-MM tree with --hf_config_dir: both towers' tensors under their own names (global
    layer numbers), both pipeline splits, TP; --check finds a replicated vision tensor that differs across TP ranks."""
    import json
    from checkpoint_convert.commands.report_cli import run_inspect_cli
    source, _ = vl_models("qwen2_vl")
    mm = tmp_path / "mm"
    assert convert("--load_path", source, "--save_path", mm, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   "--target_tensor_model_parallel_size", "2", "--vision_pipeline_layers", "2,0",
                   "--target_pipeline_layers", "1,3") == 0
    capsys.readouterr()
    assert run_inspect_cli([str(mm), "--hf_config_dir", str(source), "--check"]) == 0
    out = capsys.readouterr().out
    assert "format: mindspeed-mm torch (schema mindspeed_mm)" in out and "family: qwen2_vl" in out
    assert "layout: TP 2  PP 2  EP 1  layers per stage: 1,3  vision layers per stage: 2,0" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    assert rows["image_encoder.encoder.blocks.layers.1.mlp.linear_fc1.weight"] == [
        "64x32", "float32", "mp_rank_00_000,mp_rank_01_000"]
    assert rows["text_decoder.decoder.layers.3.mlp.linear_fc2.weight"] == [
        "64x96", "float32", "mp_rank_00_001,mp_rank_01_001"]
    assert rows["image_encoder.projector.layernorm.bias"][-1] == "mp_rank_00_000,mp_rank_01_000"
    assert "check: no problems found" in out
    assert run_inspect_cli([str(mm), "--hf_config_dir", str(source), "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert layout["towers"] == {"vision": [2, 0]} and layout["layers_per_stage"] == [1, 3] and layout["tp"] == 2
    file = mm / "release" / "mp_rank_01_000" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=True)
    state["model"]["image_encoder.encoder.blocks.layers.1.input_layernorm.bias"] += 1
    torch.save(state, file)
    assert run_inspect_cli([str(mm), "--hf_config_dir", str(source), "--check"]) == 3
    assert ("problem: image_encoder.encoder.blocks.layers.1.input_layernorm.bias: replicated tensor differs between "
            "TP ranks 0 and 1") in capsys.readouterr().out
    assert run_inspect_cli([str(mm)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --hf_config_dir" in err[0]
