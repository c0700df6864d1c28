"""One conversion split across the processes ``torchrun --standalone`` starts (see checkpoint_convert/run/distributed.py).

Every output is compared with the one process's output of the same command: rank files and Hugging Face
shards byte for byte (each file, the safetensors headers' order and the torch zip records' order with it),
``conversion.json`` but for its time; ``torch_dist`` (one data file per process) tensor for tensor with
``verify``, and by the logits of its conversion back to Hugging Face. The one-process outputs are those the
rest of the suite checks by their logits. Every registered family goes through one direction, one family
through every direction, one case with three processes; then failures: bad input in every process, bad
input in one process only, and a process killed while it writes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint_convert.commands.cli import run_convert_cli
from checkpoint_convert.run.converter import Options, open_source, plan_conversion
from checkpoint_convert.run.provenance import RECORD_FILE
from checkpoint_convert.commands.report_cli import run_verify_cli
from checkpoint_convert.run.shares import split_outputs
from checkpoint_convert.run.claim import claimed
from tests.family_kit import VARIANTS
from tests.helpers import REPO, assert_logits_close, convert, logits_of

import _bootstrap  # noqa: E402,I001  (on sys.path through tests.helpers: the families the command line registers)

CONVERT = REPO / "scripts" / "convert.py"
TP2_PP2 = ["--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2"]
EP2_PP2 = ["--target_expert_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2"]
FIRST_OF_EACH_FAMILY = list({variant.family: variant for variant in reversed(VARIANTS)}.values())[::-1]


def torchrun(processes: int, *argv: object, **popen: object) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N scripts/convert.py ARGV --quiet``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(CONVERT), *map(str, argv), "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(), **popen)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun sets it anyway, with a banner when unset


def one_process(*argv: object) -> int:
    """The same command in this process (named as torchrun's processes name it, for the provenance record)."""
    return run_convert_cli([*map(str, argv), "--quiet"], _bootstrap.FAMILIES, prog=CONVERT.name)


def _files(root: Path) -> list[Path]:
    return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())


def _tool_lines(stderr: str) -> list[str]:
    """The tool's lines among torchrun's own (its log lines and its report of the failed processes)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "internal error:", "warning:"))]


def _record(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("created")
    return record


def assert_same_output(single: Path, multi: Path, tensors_only: tuple[str, ...] = ()) -> None:
    """The same files with the same bytes (a record's time aside); files named in ``tensors_only`` (present in
    either) are compared elsewhere."""
    names = [name for name in _files(single) if name.name not in tensors_only]
    assert names == [name for name in _files(multi) if name.name not in tensors_only]
    for name in names:
        if name.name == RECORD_FILE:
            assert _record(single / name) == _record(multi / name)
        else:
            assert (single / name).read_bytes() == (multi / name).read_bytes(), f"{name} differs"


def both_ways(tmp_path: Path, capsys: pytest.CaptureFixture, processes: int, source: Path,
              *flags: object) -> tuple[Path, Path]:
    """(one process's output, ``processes`` processes' output) of converting ``source`` with ``flags``, both
    written to the same save path in turn (the path is in the record and in Megatron-Bridge's files). The
    processes print what the one process prints (its warnings, once), no more."""
    out = tmp_path / "out"
    argv = ["--load_path", source, "--save_path", out, *flags]
    capsys.readouterr()
    assert one_process(*argv) == 0
    printed = _tool_lines(capsys.readouterr().err)
    single = out.rename(tmp_path / "single")
    result = torchrun(processes, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tool_lines(result.stderr) == printed and "converting" not in result.stderr, result.stderr[-3000:]
    return single, out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A Hugging Face model of the first variant of every family, and its logits."""
    root = tmp_path_factory.mktemp("torchrun_models")
    made = {}
    for variant in FIRST_OF_EACH_FAMILY:
        made[variant.name] = (root / variant.name, logits_of(variant.build(root / variant.name)))
    return made


@pytest.mark.parametrize("name", [variant.name for variant in FIRST_OF_EACH_FAMILY])
def test_every_family_hf_to_megatron_is_byte_identical(models, tmp_path, capsys, name):
    """Two processes: each writes the rank files of one pipeline stage (experts: of its EP ranks too)."""
    experts = next(variant for variant in VARIANTS if variant.name == name).experts
    single, multi = both_ways(tmp_path, capsys, 2, models[name][0], "--to", "megatron", *(EP2_PP2 if experts else TP2_PP2))
    assert_same_output(single, multi)


@pytest.fixture(scope="module")
def llama_ranks(models, tmp_path_factory) -> Path:
    """The Llama model as Megatron TP2 PP2 rank files (one process)."""
    tree = tmp_path_factory.mktemp("torchrun_llama") / "tp2pp2"
    assert convert("--load_path", models["llama_gqa_untied"][0], "--save_path", tree, "--to", "megatron",
                   *TP2_PP2) == 0
    return tree


def test_megatron_to_hf_shards_on_three_processes(llama_ranks, tmp_path, capsys):
    """Three processes share a dozen shards (each merged from TP ranks of both stages); the leader writes the index."""
    single, multi = both_ways(tmp_path, capsys, 3, llama_ranks, "--to", "hf", "--max_shard_size", "100KB")
    assert len(list(multi.glob("model-*.safetensors"))) >= 6
    assert_same_output(single, multi)


def test_megatron_reshape_to_a_virtual_pipeline(llama_ranks, tmp_path, capsys):
    """TP2 PP2 -> TP1 PP2 with two model chunks per rank file, and the distributed optimizer's files."""
    single, multi = both_ways(tmp_path, capsys, 2, llama_ranks, "--to", "megatron", "--target_tensor_model_parallel_size", "1",
                              "--target_virtual_pipeline_model_parallel_size", "2", "--use_distributed_optimizer",
                              "--target_data_parallel_size", "2")
    assert_same_output(single, multi)


def test_torch_dist_has_the_same_tensors_and_logits(models, tmp_path, capsys):
    """One data file per process, one ``.metadata`` describing both: the same tensors as one process's output,
    and it converts back to the original's logits."""
    path, logits = models["llama_gqa_untied"]
    single, multi = both_ways(tmp_path, capsys, 2, path, "--to", "megatron", "--megatron_ckpt_format", "torch_dist")
    data_files = sorted(file.name for file in (multi / "release").glob("*.distcp"))
    assert data_files == ["__0_0.distcp", "__1_0.distcp"]
    assert_same_output(single, multi, tensors_only=(".metadata", *data_files))
    assert run_verify_cli([str(single), str(multi)]) == 0 and capsys.readouterr().out.endswith("EQUAL\n")
    assert convert("--load_path", multi, "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), logits)
    (tmp_path / "again").mkdir()
    assert_same_output(*both_ways(tmp_path / "again", capsys, 2, multi, "--to", "hf", "--max_shard_size", "300KB"))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name == name or path.name.startswith(f".{name}."))




def test_bad_input_in_every_process_gives_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = torchrun(2, "--load_path", tmp_path / "empty", "--save_path", tmp_path / "out", "--to", "hf")
    assert result.returncode != 0
    assert _tool_lines(result.stderr) == [f"error: {tmp_path / 'empty'}: neither a Megatron checkpoint (tracker "
                                           "file, mp_rank_* dirs or torch_dist files) nor a Hugging Face model "
                                           "directory (config.json)"]
    assert result.stderr.count("exitcode  : 2") == 2  # torchrun's report: both processes ended with code 2
    assert _leftovers(tmp_path, "out") == []


def test_bad_input_found_by_one_process_stops_all(tmp_path):
    """A tensor Megatron has no place for must be zero; it is not in a layer only process 1 (not the leader) reads."""
    variant = next(variant for variant in VARIANTS if variant.name == "llama_qkv_biased")
    model = variant.build(tmp_path / "hf")
    options = Options(load_path=tmp_path / "hf", save_path=tmp_path / "out", to="megatron", pipeline_parallel=2)
    plan = plan_conversion(options, open_source(options), None)
    readers = split_outputs(plan, 2).item_readers
    layer = next(item.layer for item, who in zip(plan.items, readers) if item.param.zero_in_megatron and who == {1})
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.bias.fill_(0.5)
    model.save_pretrained(tmp_path / "hf")
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "hf").iterdir()}

    result = torchrun(2, "--load_path", tmp_path / "hf", "--save_path", tmp_path / "out", "--to", "megatron",
                      "--target_pipeline_model_parallel_size", "2")
    assert _tool_lines(result.stderr) == [f"error: layer {layer} 'self_attn.o_proj.bias' is not zero, and "
                                          "Megatron's architecture has no such tensor"]
    assert result.returncode != 0 and result.stderr.count("exitcode  : 2") == 2
    assert _leftovers(tmp_path, "out") == []
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "hf").iterdir()} == before


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun (pid ``launcher``) started, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher:
            found.update((int(item[5:]), int(entry.name)) for item in environment if item.startswith(b"RANK="))
    return found


@pytest.fixture(scope="module")
def larger_model(tmp_path_factory) -> Path:
    """A 0.3 GB bf16 Llama-shaped model: long enough to write that a process can be killed while it does."""
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import Shapes, build_synthetic

    path = tmp_path_factory.mktemp("torchrun_larger") / "hf"
    build_synthetic(path, Shapes(hidden=1024, ffn=2816, heads=8, groups=4, vocab=32000), layers=10)
    return path


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's processes in /proc")
@pytest.mark.parametrize("killed", [1, 0], ids=["follower", "leader"])
def test_a_process_killed_while_writing_leaves_nothing(larger_model, tmp_path, killed):
    """SIGKILL to one process once the first rank file is being written: torchrun stops the other (SIGTERM), which
    removes the staging directory and says so in one line; no output, nothing hidden left, the source untouched."""
    out = tmp_path / "out"
    before = {path: path.stat().st_mtime_ns for path in larger_model.iterdir()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(CONVERT),
               "--load_path", str(larger_model), "--save_path", str(out), "--to", "megatron", *TP2_PP2]
    launcher = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*/release/*/*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        os.kill(_workers(launcher.pid)[killed], signal.SIGKILL)
    finally:
        stderr = launcher.communicate(timeout=120)[1]
    assert launcher.returncode != 0, "the conversion finished before a process was killed"
    assert _tool_lines(stderr) == ["error: a conversion process stopped without reporting (killed, or its machine "
                                    "lost); no output was left behind"], stderr[-3000:]
    # the killed leader's lock file stays, no longer locked: the next run takes it over
    assert _leftovers(tmp_path, "out") == ([".out.lock"] if killed == 0 else [])
    with claimed(out):
        pass
    assert {path: path.stat().st_mtime_ns for path in larger_model.iterdir()} == before


def test_mtp_layers_are_byte_identical_both_ways(tmp_path, capsys):
    """DeepSeek-V3 with its multi-token prediction layer (on the last stage, with the embedding's copy there) to
    TP2 PP2 rank files on two processes, and those back to Hugging Face on two processes."""
    from tests.test_mtp import MODELS, _with_mtp_layer

    build, _ = MODELS["deepseek_v3"]
    build(tmp_path / "hf")
    _with_mtp_layer(tmp_path / "hf", 13)
    single, multi = both_ways(tmp_path / "to_megatron", capsys, 2, tmp_path / "hf", "--to", "megatron", *EP2_PP2)
    assert_same_output(single, multi)
    assert any("mtp.layers.0" in key for key in torch.load(multi / "release" / "mp_rank_00_001_000" /
                                                           "model_optim_rng.pt", weights_only=False)["model"])
    single_hf, multi_hf = both_ways(tmp_path / "to_hf", capsys, 2, single, "--to", "hf")
    assert_same_output(single_hf, multi_hf)


def test_vision_language_model_in_mindspeed_mm_layout_is_byte_identical_both_ways(tmp_path, capsys):
    """Qwen2.5-VL to MindSpeed-MM rank files at TP2 with the vision tower 2,0 and the language model 1,3 on two
    processes, and those back to Hugging Face (with --hf_config_dir) on two processes."""
    from tests.test_qwen2_vl import tiny_vl

    source = tiny_vl("qwen2_5_vl", tmp_path / "hf")
    single, multi = both_ways(tmp_path / "to_mm", capsys, 2, source, "--to", "megatron", "--megatron_format",
                              "mindspeed_mm", "--target_tensor_model_parallel_size", "2", "--vision_pipeline_layers",
                              "2,0", "--target_pipeline_layers", "1,3")
    assert_same_output(single, multi)
    assert len(list((multi / "release").glob("mp_rank_*_00*/model_optim_rng.pt"))) == 4
    single_hf, multi_hf = both_ways(tmp_path / "to_hf", capsys, 2, single, "--to", "hf", "--hf_config_dir", source,
                                    "--max_shard_size", "300KB")
    assert len(list(multi_hf.glob("model-*.safetensors"))) >= 2
    assert_same_output(single_hf, multi_hf)
