"""conversion.json: written inside every output (beside config.json, or in the Megatron iteration directory), it
says which tool version made the output from which source files, how; inspect shows it; readers ignore it."""
from __future__ import annotations

import hashlib
import json

import pytest

from checkpoint_convert.run.provenance import tool_version
from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli
from tests.helpers import REPO, assert_logits_close, convert, logits_of, reference_megatron_gpt2, tiny_gpt2

RECORD_PLACES = {  # flags -> where the record goes
    ("--to", "hf"): "conversion.json",
    ("--to", "megatron"): "release/conversion.json",
    ("--to", "megatron", "--megatron_ckpt_format", "torch_dist"): "release/conversion.json",
    ("--to", "megatron", "--megatron_bridge"): "iter_0000000/conversion.json",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    model = tiny_gpt2(None)
    return reference_megatron_gpt2(model, root / "gpt2_tp2", tp=2, pp=1, schema="local"), logits_of(model)


@pytest.mark.parametrize("flags", list(RECORD_PLACES), ids=["hf", "torch", "torch_dist", "megatron_bridge"])
def test_every_output_carries_its_record_and_still_loads(source, tmp_path, flags):
    tree, logits = source
    out = tmp_path / "out"
    assert convert("--load_path", tree, "--save_path", out, *flags, "--target_tensor_model_parallel_size", "1") == 0
    record = json.loads((out / RECORD_PLACES[flags]).read_text())
    assert record["tool"] == {"name": "megatron-hf-convert", "version": tool_version()}
    assert record["command"][1:] == ["--load_path", str(tree), "--save_path", str(out), *flags,
                                     "--target_tensor_model_parallel_size", "1", "--quiet"]
    assert record["settings"]["target_tensor_model_parallel_size"] == 1 and record["settings"]["to"] == flags[1]
    assert record["source"]["path"] == str(tree.resolve()) and record["source"]["format"] == "megatron torch"
    assert record["source"]["layout"]["tp"] == 2 and record["source"]["schema"] == "local"
    assert record["target"]["format"] == {"hf": "huggingface safetensors"}.get(flags[1], record["target"]["format"])
    if flags[1] == "megatron":
        assert record["target"]["layout"]["tp"] == 1 and record["target"]["format"].endswith(
            "torch_dist" if len(flags) > 2 else "torch")
    # readers ignore the extra file: ours reads the output back (transformers' from_pretrained for HF)
    back = out if flags[1] == "hf" else tmp_path / "back"
    if flags[1] == "megatron":
        assert convert("--load_path", out, "--save_path", back, "--to", "hf") == 0
    assert_logits_close(logits_of(back), logits)


def test_fingerprint_lists_source_files_with_sizes_times_and_hashes(source, tmp_path):
    tree, _ = source
    assert convert("--load_path", tree, "--save_path", tmp_path / "out", "--to", "hf", "--hash") == 0
    files = json.loads((tmp_path / "out" / "conversion.json").read_text())["source"]["files"]
    on_disk = sorted(p for p in tree.rglob("*") if p.is_file())
    assert [entry["path"] for entry in files] == [p.relative_to(tree).as_posix() for p in on_disk]
    for entry, path in zip(files, on_disk):
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["modified"].endswith("+00:00")


def test_inspect_shows_the_record(source, tmp_path, capsys):
    tree, _ = source
    assert convert("--load_path", tree, "--save_path", tmp_path / "out", "--to", "megatron", "--megatron_ckpt_format",
                   "torch_dist") == 0
    capsys.readouterr()
    assert run_inspect_cli([str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert f"made by: megatron-hf-convert {tool_version()}" in text
    assert f"from: {tree.resolve()} (megatron torch, " in text and "as: megatron torch_dist TP 2 PP 1 EP 1" in text
    assert run_inspect_cli([str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["source"]["path"] == str(tree.resolve())
    assert run_inspect_cli([str(tree)]) == 0 and "made by:" not in capsys.readouterr().out  # none recorded
    assert run_verify_cli([str(tree), str(tmp_path / "out")]) == 0  # verify ignores it too


def test_a_checkout_reports_its_git_version():
    version = tool_version()
    assert version != "unknown"
    if (REPO / ".git").exists():
        assert version.startswith("git ")


def test_unreadable_record_is_bad_input(source, tmp_path, capsys):
    tree, _ = source
    assert convert("--load_path", tree, "--save_path", tmp_path / "out", "--to", "hf") == 0
    (tmp_path / "out" / "conversion.json").write_text("{not json")
    capsys.readouterr()
    assert run_inspect_cli([str(tmp_path / "out")]) == 2
    assert "conversion.json: unreadable provenance record" in capsys.readouterr().err
