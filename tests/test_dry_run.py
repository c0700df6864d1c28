"""--dry_run: the files and byte sizes it predicts are the ones a real run writes, for every output format, and it
writes nothing; its Megatron args are the ones written; its memory figure is README's bound."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from checkpoint_convert.run import claim, output
from checkpoint_convert.formats.safe_load import safe_torch_load
from tests.helpers import convert, reference_megatron_gpt2, tiny_gpt2

HF_LLAMA = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "megatron_bridge_llama" / "hf"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    megatron = reference_megatron_gpt2(tiny_gpt2(None), root / "gpt2_tp2pp2", tp=2, pp=2, schema="legacy")
    return {"megatron": megatron, "hf": HF_LLAMA}


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {path.relative_to(root).as_posix(): path.stat().st_size for path in root.rglob("*") if path.is_file()}


def _dry_run(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = convert(*argv, "--dry_run", "--json")
    out = capsys.readouterr().out
    return code, json.loads(out) if code in (0, 2) and out.strip() else {}


CASES = {  # name: (source, flags)
    "hf_shards": ("megatron", ["--to", "hf", "--max_shard_size", "200KB"]),
    "hf_bin": ("megatron", ["--to", "hf", "--no-safe_serialization", "--max_shard_size", "300KB"]),
    "rank_files": ("hf", ["--to", "megatron", "--target_tensor_model_parallel_size", "2",
                          "--target_pipeline_layers", "1,2,0,1", "--target_virtual_pipeline_model_parallel_size", "2",
                          "--use_distributed_optimizer", "--target_data_parallel_size", "2"]),
    "legacy_rank_files": ("megatron", ["--to", "megatron", "--target_tensor_model_parallel_size", "1", "--zip_crc32"]),
    "torch_dist": ("megatron", ["--to", "megatron", "--megatron_ckpt_format", "torch_dist",
                                "--target_params_dtype", "bf16"]),
    "megatron_bridge": ("hf", ["--to", "megatron", "--megatron_bridge"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dry_run_predicts_every_file_and_byte_a_run_writes(sources, tmp_path, capsys, case):
    source, flags = CASES[case]
    argv = ["--load_path", sources[source], "--save_path", tmp_path / "out", *flags]
    code, plan = _dry_run(capsys, *argv)
    assert code == 0
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    assert convert(*argv) == 0
    written = _tree(tmp_path / "out")
    predicted = {entry["path"]: entry["bytes"] for entry in plan["files"]}
    assert predicted == written  # the provenance record too: same command line but for the dry run's flags
    assert plan["total_bytes"] == sum(written.values())
    if case == "hf_shards":
        shards = {entry["path"]: entry["tensors"] for entry in plan["files"] if entry["path"].endswith(".safetensors")}
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(shards) > 1 and shards == {name: list(index.values()).count(name) for name in shards}


def test_dry_run_args_are_the_args_written(sources, tmp_path, capsys):
    argv = ["--load_path", sources["hf"], "--save_path", tmp_path / "out", "--to", "megatron",
            "--megatron_ckpt_format", "torch_dist", "--seq_length", "64"]
    _, plan = _dry_run(capsys, *argv)
    assert convert(*argv) == 0
    written = safe_torch_load(tmp_path / "out" / "release" / "common.pt", lazy=False)["args"]
    assert plan["megatron_args"] == json.loads(json.dumps({k: v if isinstance(v, (bool, int, float, str, type(None),
                                                                                     list, dict)) else str(v)
                                                           for k, v in sorted(vars(written).items())}))
    assert plan["megatron_args"]["seq_length"] == 64 and plan["target"]["format"] == "megatron torch_dist"


def test_dry_run_memory_is_startup_plus_two_largest_tensors(sources, tmp_path, capsys):
    _, plan = _dry_run(capsys, "--load_path", sources["hf"], "--save_path", tmp_path / "out", "--to", "megatron",
                       "--target_params_dtype", "fp32")
    config = json.loads((HF_LLAMA / "config.json").read_text())
    embedding = config["vocab_size"] * config["hidden_size"]
    # bf16 source cast to fp32: the largest tensor in flight is the fp32 embedding (or the padded output copy)
    assert embedding * 4 <= plan["memory"]["largest_tensor_bytes"] <= embedding * 4 * 1.2
    memory = plan["memory"]
    assert memory["peak_bytes"] == memory["startup_bytes"] + 2 * memory["largest_tensor_bytes"] + 100 * 2**20
    assert memory["startup_bytes"] > 100 * 2**20  # this process, torch imported


def test_dry_run_text_lists_files_args_and_warnings(sources, tmp_path, capsys):
    capsys.readouterr()
    assert convert("--load_path", sources["megatron"], "--save_path", tmp_path / "out", "--to", "megatron",
                   "--dry_run") == 0
    text = capsys.readouterr().out
    assert "release/mp_rank_00_000/model_optim_rng.pt" in text and "latest_checkpointed_iteration.txt" in text
    assert "num_layers = 4" in text and "tensor_model_parallel_size = 2" in text
    assert "warning: the source names no tokenizer" in text  # what the real run warns about, listed
    assert "memory: about" in text and text.rstrip().endswith("dry run: nothing was written")
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_too_little_disk_and_exits_2(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6, free=1000))
    code, plan = _dry_run(capsys, "--load_path", sources["megatron"], "--save_path", tmp_path / "out", "--to", "hf")
    assert code == 2 and plan["problems"] and "GiB are free" in plan["problems"][0]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_reports_a_run_holding_the_save_path(sources, tmp_path, capsys):
    """A dry run while another conversion holds the save path says so (exit 2) and takes no claim itself."""
    with claim.claimed(tmp_path / "out") as running:
        code, plan = _dry_run(capsys, "--load_path", sources["megatron"], "--save_path", tmp_path / "out", "--to", "hf")
    assert code == 2 and len(plan["problems"]) == 1
    assert "another conversion is writing this save path" in plan["problems"][0]
    assert f"pid {running.pid}" in plan["problems"][0]
    assert list(tmp_path.iterdir()) == []  # the holder's lock file went with it; the dry run made none
    code, plan = _dry_run(capsys, "--load_path", sources["megatron"], "--save_path", tmp_path / "out", "--to", "hf")
    assert code == 0 and plan["problems"] == []


def test_dry_run_refuses_bad_input_like_a_run(sources, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    capsys.readouterr()
    assert convert("--load_path", sources["megatron"], "--save_path", tmp_path / "out", "--to", "hf", "--dry_run") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "not empty" in error and len(error.splitlines()) == 1
    assert convert("--load_path", sources["megatron"], "--save_path", tmp_path / "o2", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "3", "--dry_run") == 2
    assert "does not divide" in capsys.readouterr().err


def test_meta_tensors_never_reach_a_disk_sink(tmp_path):
    """A dry run's meta tensors are sized by its sink; a real writer given one fails instead of writing garbage."""
    from checkpoint_convert.formats.hf_io import SafetensorsStreamWriter
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32)])
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        writer.write("a", torch.empty(2, device="meta"))
