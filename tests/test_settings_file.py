"""Settings: every flag also from a --config file and the environment (command line > environment > file >
defaults), the commented template --print_config prints, the record of where each setting came from, grouped help."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from checkpoint_convert.commands.cli import CONVERT_ENV_PREFIX, build_convert_parser, run_convert_cli
from checkpoint_convert.commands.cli_settings import NOT_SETTINGS, parse_settings, setting_actions, template
from checkpoint_convert.commands.report_cli import (INSPECT_ENV_PREFIX, VERIFY_ENV_PREFIX, build_inspect_parser,
                                           build_verify_parser, run_inspect_cli, run_verify_cli)
from tests.helpers import _bootstrap, convert, reference_megatron_gpt2, tiny_gpt2

TP_VARIABLE = CONVERT_ENV_PREFIX + "TARGET_TENSOR_MODEL_PARALLEL_SIZE"
PARSERS = {"convert": (lambda: build_convert_parser(_bootstrap.FAMILIES), CONVERT_ENV_PREFIX),
           "inspect": (build_inspect_parser, INSPECT_ENV_PREFIX), "verify": (build_verify_parser, VERIFY_ENV_PREFIX)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return reference_megatron_gpt2(tiny_gpt2(None), tmp_path_factory.mktemp("settings") / "tp2pp2", tp=2, pp=2,
                                   schema="legacy")


def _printed(capsys, *argv) -> str:
    """What ``--print_config`` prints for ``argv`` (run as a user runs it: no --quiet added)."""
    capsys.readouterr()
    assert run_convert_cli([*map(str, argv), "--print_config"], _bootstrap.FAMILIES) == 0
    return capsys.readouterr().out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "conversion.json"}


def _record(root: Path) -> dict:
    return json.loads((root / "release" / "conversion.json").read_text())


def test_the_template_filled_in_reruns_the_command_line(tree, tmp_path, capsys, monkeypatch):
    """--print_config alone prints every setting (help, kind, default, REQUIRED); the file with its required keys
    filled in (one setting from the environment instead) writes the command line's output byte for byte."""
    monkeypatch.chdir(tmp_path)
    printed = _printed(capsys)
    assert "load_path: null" in printed and "# text; REQUIRED" in printed
    assert "# Whole number >= 1 (a parallel size or multiple); default: 128\nmake_vocab_size_divisible_by: 128" in printed
    assert yaml.safe_load(printed)["safe_serialization"] is True
    filled = printed.replace("load_path: null", f"load_path: {tree}").replace("save_path: null", "save_path: by_file")
    filled = filled.replace("to: null", "to: megatron").replace("megatron_format: null", "megatron_format: mcore")
    filled = filled.replace("target_pipeline_layers: null", "target_pipeline_layers: [3, 1]")
    (tmp_path / "c.yaml").write_text(filled.replace("safe_serialization: true", "safe_serialization: false"))
    assert convert("--load_path", tree, "--save_path", "by_flags", "--to", "megatron", "--target-pipeline-layers",
                   "3,1", "--target_tensor_model_parallel_size", "1", "--megatron_format", "mcore",
                   "--no-safe_serialization") == 0
    monkeypatch.setenv(TP_VARIABLE, "1")
    assert convert("--config", "c.yaml") == 0
    assert _files(tmp_path / "by_file") == _files(tmp_path / "by_flags")
    by_file, by_flags = _record(tmp_path / "by_file"), _record(tmp_path / "by_flags")
    sources = by_file.pop("setting_sources")
    assert sources["load_path"] == f"config file {tmp_path / 'c.yaml'}" and sources["quiet"] == "command line"
    assert sources["target_tensor_model_parallel_size"] == f"environment {TP_VARIABLE}"
    assert set(sources.values()) == {sources["load_path"], "command line", f"environment {TP_VARIABLE}"}
    assert set(by_flags.pop("setting_sources").values()) == {"command line", "default"}
    assert by_file.pop("command")[1:] == ["--config", "c.yaml", "--quiet"] and by_flags.pop("command")[1] == "--load_path"
    for record in (by_file, by_flags):  # the rest is equal but for the time and the output's path
        record.pop("created"), record["target"].pop("path"), record["settings"].pop("save_path")
    assert by_file == by_flags


def test_command_line_beats_environment_beats_file_beats_defaults(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.json"  # a JSON file: --print_config answers in JSON
    config.write_text(json.dumps({"load-path": "src", "save_path": "dst", "to": "hf", "target_tensor_model_parallel_size": 2,
                                  "target_pipeline_model_parallel_size": 2, "target_data_parallel_size": 2,
                                  "quiet": True, "debug": True, "dry_run": True, "tokenizer_name": None}))
    monkeypatch.setenv(TP_VARIABLE, "3")
    monkeypatch.setenv(CONVERT_ENV_PREFIX + "TARGET_PIPELINE_MODEL_PARALLEL_SIZE", "3")
    monkeypatch.setenv(CONVERT_ENV_PREFIX + "QUIET", "off")
    monkeypatch.setenv(CONVERT_ENV_PREFIX + "MAX_SHARD_SIZE", "")  # empty: unset
    printed = json.loads(_printed(capsys, "--config", config, "--target_tensor_model_parallel_size", "4"))
    assert [printed[f"target_{axis}_parallel_size"] for axis in ("tensor_model", "pipeline_model", "data")] == [4, 3, 2]
    assert printed["quiet"] is False and printed["debug"] is True and printed["dry_run"] is True
    assert printed["make_vocab_size_divisible_by"] == 128 and printed["max_shard_size"] == "10GB"
    assert "tokenizer_name" not in printed and "config" not in printed
    assert json.loads(_printed(capsys, "--config", config, "--no-safe_serialization"))["safe_serialization"] is False
    config.rename(tmp_path / "c.yaml")
    commented = _printed(capsys, "--config", tmp_path / "c.yaml", "--target_tensor_model_parallel_size", "4")
    assert f"now from the environment {TP_VARIABLE}" not in commented and "now from the command line\n" \
        "target_tensor_model_parallel_size: 4" in commented
    assert f"now from the config file {tmp_path / 'c.yaml'}\ntarget_data_parallel_size: 2" in commented


@pytest.mark.parametrize("command", PARSERS)
def test_every_flag_is_a_setting_of_files_and_the_environment(command, tmp_path):
    """Every optional flag but --help/--config/--print_config: a template entry, a file key and a variable."""
    build, prefix = PARSERS[command]
    parser = build()
    flags = {action.dest for action in parser._actions if action.option_strings}
    assert set(setting_actions(parser)) == flags - set(NOT_SETTINGS)
    settings = parse_settings(parser, ["--print_config"], environ={})
    assert set(yaml.safe_load(template(parser, settings))) == flags - set(NOT_SETTINGS)
    for name, action in setting_actions(parser).items():
        switch = isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0
        text = "true" if switch else action.choices[-1] if action.choices else "2"
        parsed = parse_settings(build(), ["--print_config"], environ={prefix + name.upper(): text})
        expected = True if switch else action.choices[-1] if action.choices else action.type("2") if action.type else "2"
        assert getattr(parsed.args, name) == expected and parsed.sources[name] == f"environment {prefix}{name.upper()}"
        (tmp_path / "one.yaml").write_text(yaml.safe_dump({name: yaml.safe_load(text)}))
        parsed = parse_settings(build(), ["--print_config", "--config", str(tmp_path / "one.yaml")], environ={})
        assert getattr(parsed.args, name) == expected and parsed.sources[name].startswith("config file ")


def test_a_flag_added_to_a_group_is_a_setting_with_no_further_edit():
    parser = build_convert_parser(_bootstrap.FAMILIES)
    group = next(group for group in parser._action_groups if group.title == "Hugging Face output")
    group.add_argument("--hf_new_thing", type=int, default=3, help="a flag another change adds")
    settings = parse_settings(parser, ["--print_config"], environ={CONVERT_ENV_PREFIX + "HF_NEW_THING": "5"})
    assert settings.args.hf_new_thing == 5
    printed = template(parser, settings)
    hf_section = printed.split("# ===== Hugging Face output =====")[1].split("# =====")[0]
    assert "# a flag another change adds\n# integer; default: 3; now from the environment" in hf_section
    assert "hf_new_thing: 5" in hf_section


@pytest.mark.parametrize("content,message", [
    ({"load_path": "x", "shard_size": "1GB"}, "unknown setting 'shard_size': no flag of convert.py is named --shard_"),
    ({"no-safe-serialization": True}, "'no_safe_serialization' is the off spelling of --safe_serialization: set "
                                      "'safe_serialization' to false"),
    ({"config": "other.yaml"}, "--config cannot be a setting: it names the settings file itself"),
    ({"print-config": True}, "--print_config cannot be a setting: it prints the settings instead of running"),
    ({"help": True}, "--help cannot be a setting"),
    ({"overwrite": "yes"}, "setting 'overwrite' is an on/off flag: give true or false"),
    ({"to": {"a": 1}}, "setting 'to' takes a value"),
    ({"to": "torch"}, "setting 'to' has a bad value: 'torch' is not one of hf, megatron"),
    ({"target_tensor_model_parallel_size": 0}, "setting 'target_tensor_model_parallel_size' has a bad value: '0' is "
                                               "not a whole number of at least 1"),
    (["--to", "hf"], "must be a mapping"),
])
def test_bad_settings_files_are_one_line_errors(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_convert_cli(["--config", str(config)], _bootstrap.FAMILIES, prog="convert.py")
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"error: {config}: ") and message in error


@pytest.mark.parametrize("variable,value,message", [
    (TP_VARIABLE, "0", f"{TP_VARIABLE} has a bad value: '0' is not a whole number of at least 1"),
    (CONVERT_ENV_PREFIX + "MODEL", "gpt3", "MODEL has a bad value: 'gpt3' is not one of deepseek_v2"),
    (CONVERT_ENV_PREFIX + "DRY_RUN", "maybe", "DRY_RUN is an on/off flag: give one of 1, true, yes, on, 0, false"),
    (CONVERT_ENV_PREFIX + "TP", "2", "_TP: unknown setting 'tp': no flag of convert.py is named --tp"),
    (CONVERT_ENV_PREFIX + "CONFIG", "c.yaml", "_CONFIG: --config cannot be a setting: it names the settings file"),
    (INSPECT_ENV_PREFIX + "PATH", "/x", "_PATH: 'path' is the command's positional argument, not a flag: give it on"),
])
def test_bad_variables_are_one_line_errors_naming_them(variable, value, message, capsys, monkeypatch):
    monkeypatch.setenv(variable, value)
    run = run_inspect_cli if variable.startswith(INSPECT_ENV_PREFIX) else (
        lambda argv: run_convert_cli(argv, _bootstrap.FAMILIES, prog="convert.py"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(["--print_config"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1 and error.startswith(f"error: {variable}")
    assert message in error


def test_a_missing_flag_says_where_it_can_be_set(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_convert_cli(["--load_path", "x"], _bootstrap.FAMILIES, prog="convert.py")
    error = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == 2 and error.endswith(
        "required: --save_path/--save-path, --to (on the command line, as MEGATRON_HF_CONVERT_<FLAG>, or in a --config "
        "file)")


def test_inspect_and_verify_read_settings_too(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(INSPECT_ENV_PREFIX + "JSON", "1")
    capsys.readouterr()
    assert run_inspect_cli([str(tree)]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["tp"] == 2
    (tmp_path / "v.yaml").write_text("atol: 0.5\nlogits: false\n")
    assert run_verify_cli([str(tree), str(tree), "--config", str(tmp_path / "v.yaml")]) == 0
    assert "(atol 0.5)" in capsys.readouterr().out


@pytest.mark.parametrize("command,groups", [
    ("convert", ["source", "target layout", "Megatron output", "Hugging Face output", "safety", "run and scale-out"]),
    ("inspect", ["source", "report", "safety", "run"]),
    ("verify", ["sources", "comparison", "safety", "run"]),
])
def test_help_is_grouped_with_examples_and_the_precedence(command, groups, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    build, prefix = PARSERS[command]
    parser = build()
    parser.prog = f"megatron-hf-{command}"
    text = parser.format_help()
    sections = text.split("\n\n")
    titles = [section.split("\n")[0].rstrip(":") for section in sections if section.endswith(":") or ":\n" in section]
    assert [title for title in titles if title in groups] == groups
    assert max(section.count("\n") + 1 for section in sections) <= 30  # each group fits a screen
    assert max(map(len, text.splitlines())) <= 100
    assert "examples:" in text and f"{prefix}<FLAG>" in text
    assert "the command line wins over the environment, which wins over the file" in " ".join(text.split())
    assert not re.search(r"--\w+ [A-Z_]{12,}", text)  # short metavars, not the flag's name in capitals
