"""--config FILE (YAML or JSON) and --print_config: a migration kept as a file reruns as the command line did."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import convert, reference_megatron_gpt2, tiny_gpt2


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return reference_megatron_gpt2(tiny_gpt2(None), tmp_path_factory.mktemp("settings") / "tp2pp2", tp=2, pp=2,
                                   schema="legacy")


def _printed(capsys, *argv) -> str:
    capsys.readouterr()
    assert convert(*argv, "--print_config") == 0
    return capsys.readouterr().out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "conversion.json"}


def test_printed_settings_rerun_the_command_line(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = ["--load_path", tree, "--save_path", "by_flags", "--to", "megatron", "--target-pipeline-layers", "3,1",
               "--target_tensor_model_parallel_size", "1", "--megatron_format", "mcore", "--no-safe_serialization"]
    printed = _printed(capsys, *command)
    settings = yaml.safe_load(printed)
    assert settings["target_pipeline_layers"] == [3, 1] and settings["safe_serialization"] is False
    (tmp_path / "migration.yaml").write_text(printed.replace("by_flags", "by_file"))
    assert convert(*command) == 0
    assert convert("--config", "migration.yaml") == 0
    assert _files(tmp_path / "by_file") == _files(tmp_path / "by_flags")
    assert yaml.safe_load(_printed(capsys, "--config", "migration.yaml")) == dict(settings, save_path="by_file")
    record = json.loads((tmp_path / "by_file" / "release" / "conversion.json").read_text())
    assert record["command"][1:] == ["--config", "migration.yaml", "--quiet"] and record["settings"]["save_path"] == "by_file"


def test_command_line_flags_win_and_json_files_work(tree, tmp_path, capsys):
    config = tmp_path / "migration.json"
    config.write_text(json.dumps({"load-path": str(tree), "save_path": str(tmp_path / "out"), "to": "hf",
                                  "target_params_dtype": "fp16", "max_shard_size": "1MB", "tokenizer_name": None}))
    printed = json.loads(_printed(capsys, "--config", config, "--target_params_dtype", "bf16"))  # JSON file: JSON out
    assert printed["target_params_dtype"] == "bf16" and printed["max_shard_size"] == "1MB"
    assert "tokenizer_name" not in printed and "config" not in printed
    assert yaml.safe_load(_printed(capsys, "--config", config, "--json"))["to"] == "hf"


@pytest.mark.parametrize("content,message", [
    ({"load_path": "x", "shard_size": "1GB"}, "unknown setting 'shard_size'"),
    ({"dry_run": True}, "unknown setting 'dry_run'"),
    ({"overwrite": "yes"}, "setting 'overwrite' is an on/off flag"),
    ({"to": {"a": 1}}, "setting 'to' takes a value"),
    (["--to", "hf"], "must be a mapping"),
])
def test_bad_settings_files_are_one_line_errors(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        convert("--config", config)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"error: {config}: ") and message in error


def test_settings_values_are_checked_as_flags_are(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("load_path: x\nsave_path: y\nto: hf\ntarget_tensor_model_parallel_size: 0\n")
    with pytest.raises(SystemExit) as exit_:
        convert("--config", config)
    assert exit_.value.code == 2 and "not a whole number of at least 1" in capsys.readouterr().err
