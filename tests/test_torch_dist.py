"""torch_dist checkpoints: written by megatron-core itself, read by megatron-core, and every direction between.

megatron-core writes the sources with ``dist_checkpointing.save`` (as Megatron-LM's save_checkpoint
does) and loads our output with ``dist_checkpointing.load`` into a GPTModel (every key it asks for
must be present, strict ``load_state_dict``): the logits prove both directions. The family kit
(test_family_kit.py) runs both for every family; here are the format's own cases.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TOKENS, assert_logits_close, convert, logits_of, plain_torch_allowlist
from tests.test_errors import snapshot
from tests.test_llama import tiny_llama
from tests.test_megatron_core import ATOL, SPECS, megatron_core_logits, run_oracle
from tests.test_mixtral import tiny_mixtral

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -r requirements-dev.txt)")


@pytest.fixture(autouse=True)
def without_megatron_safe_globals():
    """Sources load as in the command-line tool's process, not thanks to what megatron-core registered."""
    with plain_torch_allowlist():
        yield


@pytest.fixture(scope="module")
def megatron_dist(tmp_path_factory):
    """``(family, tp) -> (torch_dist dir, megatron-core's logits)``, each saved once by megatron-core."""
    saved = {}

    def make(family, tp=1):
        if (family, tp) not in saved:
            root = tmp_path_factory.mktemp(f"{family}_tp{tp}")
            (root / "spec.json").write_text(json.dumps(SPECS[family]))
            torch.save(TOKENS, root / "tokens.pt")
            run_oracle("dist-make", root / "spec.json", root / "dist", root / "tokens.pt", tp)
            saved[(family, tp)] = root / "dist", torch.load(root / "megatron_logits.pt")
        return saved[(family, tp)]
    return make


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_torch_dist_saved_by_megatron_core_converts_to_hf(tmp_path, megatron_dist, family):
    """Saved with RNG and optimizer state, FP8 args and TE extra state, as a training run saves it
    (``megatron_oracle._training_state``); the source is untouched (every family's torch_dist saved by
    megatron-core at TP2: the family kit)."""
    source, expected = megatron_dist(family)
    before = snapshot(source)
    assert convert("--load_path", source, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    assert_logits_close(logits_of(tmp_path / "hf"), expected, atol=ATOL)
    assert snapshot(source) == before


@pytest.mark.parametrize("family", ["llama"])
def test_torch_dist_saved_at_tensor_parallel_2_converts_to_hf(tmp_path, megatron_dist, family):
    """Chunks split by TP rank (vocab rows, qkv rows, fc1 as four gate/up fragments, row-parallel columns)."""
    source, expected = megatron_dist(family, tp=2)
    from checkpoint_convert.formats.torch_dist import read_metadata

    common = torch.load(source / "iter_0000001" / "common.pt", weights_only=False)
    assert common["args"].tensor_model_parallel_size == 2
    qkv = read_metadata(source / "iter_0000001").state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 2 * qkv.size[0]  # one chunk per layer and TP rank
    assert convert("--load_path", source, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected, atol=ATOL)


def test_the_tracker_names_the_torch_dist_iteration_to_read(tmp_path, megatron_dist):
    """An older iteration beside the latest (another model): the tracker's is converted."""
    import shutil

    source, expected = megatron_dist("llama")
    shutil.copytree(source, tmp_path / "run")
    tiny_llama(tmp_path / "older_hf", seed=9)
    assert convert("--load_path", tmp_path / "older_hf", "--save_path", tmp_path / "older", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist") == 0
    (tmp_path / "older" / "release").rename(tmp_path / "run" / "iter_0000000")
    assert convert("--load_path", tmp_path / "run", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected, atol=ATOL)


def test_torch_dist_reshaped_to_tensor_parallel_rank_files_runs_in_megatron_core(tmp_path, megatron_dist):
    """megatron-core's torch_dist -> mp_rank tree at TP2 -> megatron-core with two processes."""
    source, expected = megatron_dist("llama")
    assert convert("--load_path", source, "--save_path", tmp_path / "tp2", "--to", "megatron",
                   "--megatron_ckpt_format", "torch", "--target_tensor_model_parallel_size", "2") == 0
    assert sorted(p.name for p in (tmp_path / "tp2" / "release").iterdir()) == ["conversion.json", "mp_rank_00",
                                                                                "mp_rank_01"]
    assert_logits_close(megatron_core_logits(tmp_path / "tp2", tmp_path, tp=2), expected, atol=ATOL)


def test_torch_dist_keeps_the_virtual_pipeline_it_was_trained_with(tmp_path):
    """HF -> torch_dist recording PP 2 x VPP 2 -> rank files (default layout: model0/model1) -> HF."""
    model = tiny_llama(tmp_path / "hf", seed=5)
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "dist", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist", "--target_pipeline_model_parallel_size", "2",
                   "--target_virtual_pipeline_model_parallel_size", "2") == 0
    assert torch.load(tmp_path / "dist/release/common.pt", weights_only=False)["args"].virtual_pipeline_model_parallel_size == 2
    assert convert("--load_path", tmp_path / "dist", "--save_path", tmp_path / "ranks", "--to", "megatron",
                   "--megatron_ckpt_format", "torch") == 0
    state = torch.load(tmp_path / "ranks/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)
    assert sorted(k for k in state if k.startswith("model")) == ["model0", "model1"]
    assert convert("--load_path", tmp_path / "ranks", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), logits_of(model))


def test_chunks_are_saved_without_zip_checksums_and_load(tmp_path):
    """The CRC-32s halve torch.save's speed and nothing reads them: every tensor record holds 0 instead."""
    import io
    import zipfile

    from checkpoint_convert.formats.torch_dist import read_metadata

    model = tiny_llama(tmp_path / "hf", seed=6)
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "dist", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist") == 0
    iter_dir = tmp_path / "dist" / "release"
    storage = read_metadata(iter_dir).storage_data
    data = {name: path.read_bytes() for name, path in ((p.name, p) for p in iter_dir.glob("*.distcp"))}
    tensors = [info for index, info in storage.items() if "_extra_state" not in index.fqn]
    assert tensors
    for info in tensors:
        blob = data[info.relative_path][info.offset:info.offset + info.length]
        records = [record for record in zipfile.ZipFile(io.BytesIO(blob)).infolist() if "/data/" in record.filename]
        assert records and all(record.CRC == 0 for record in records)
    assert convert("--load_path", tmp_path / "dist", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), logits_of(model))


_WRITES_WITHOUT_DCP = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/scripts"]
import _bootstrap
from checkpoint_convert.formats import torch_dist_writer
from checkpoint_convert.commands.cli import run_convert_cli

imported_during_writes = []
write = torch_dist_writer.TorchDistWriter.write

def recording_write(self, key, tensor):
    imported_during_writes.append("torch.distributed.checkpoint" in sys.modules)
    write(self, key, tensor)

torch_dist_writer.TorchDistWriter.write = recording_write
code = run_convert_cli(sys.argv[2:], _bootstrap.FAMILIES)
print(json.dumps([code, imported_during_writes]))
"""


def test_torch_dist_output_streams_before_torch_distributed_checkpoint_is_imported(tmp_path):
    """Its import costs about a second; the writer needs DCP's classes only for ``.metadata``, at the end."""
    import subprocess
    import sys

    from tests.helpers import REPO

    model = tiny_llama(tmp_path / "hf", seed=8)
    argv = ["--load_path", tmp_path / "hf", "--save_path", tmp_path / "dist", "--to", "megatron",
            "--megatron_ckpt_format", "torch_dist", "--quiet"]
    result = subprocess.run([sys.executable, "-c", _WRITES_WITHOUT_DCP, REPO, *argv], capture_output=True, text=True,
                            check=True)
    code, imported_during_writes = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0 and imported_during_writes and not any(imported_during_writes)
    assert convert("--load_path", tmp_path / "dist", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), logits_of(model))


def test_inspect_shows_what_a_torch_dist_checkpoint_holds_beside_the_model(megatron_dist, capsys):
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    source, _ = megatron_dist("mixtral")
    assert run_inspect_cli([str(source), "--json", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "megatron torch_dist" and report["iteration"] == 1 and report["problems"] == []
    assert "optimizer.state.exp_avg.embedding.word_embeddings.weight" in report["skipped"]
    assert "rng_state/shard_0.0_1.1" in report["skipped"]
    extra = {row["name"]: row for row in report["extra_state"]}
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_1_2" in extra
    assert all(row["form"] == ["bytes"] and row["bytes"] > 1000 for row in extra.values())  # the BytesIO's zip
    experts = next(row for row in report["tensors"] if row["name"] == "decoder.layers.1.mlp.experts.local_experts.*.linear_fc1.weight")
    assert experts["shape"] == [4, 192, 64] and experts["held_by"]


def test_torch_dist_reads_one_layer_at_a_time(megatron_dist):
    """A layer slice is read from the chunks of that layer only (torch_dist data is never loaded whole)."""
    from checkpoint_convert.formats.megatron_formats import open_megatron_tree

    source, _ = megatron_dist("llama")
    tree = open_megatron_tree(source)
    reads = []  # the chunks read for each slice: loaded whole, or assembled by DCP's reader
    original_read, original_load = tree._reader.read_data, tree._load_chunk

    def counting_read(plan, planner):
        reads.append([item.storage_index.offset for item in plan.items])
        return original_read(plan, planner)

    def counting_load(fqn, entry, chunk):
        reads.append([chunk.offsets])
        return original_load(fqn, entry, chunk)
    tree._reader.read_data, tree._load_chunk = counting_read, counting_load
    qkv = tree.tensor(None, "self_attention.linear_qkv.weight", 1)
    assert qkv.shape == (128, 64) and reads == [[torch.Size([1, 0, 0])]]
    assert _file_mapped_at(qkv.data_ptr()).endswith(".distcp")  # a view of the data file, not a copy
    fc1 = tree.tensor(None, "mlp.linear_fc1.weight", 2)
    assert fc1.shape == (192, 64) and len(reads[-1]) == 2  # the gate and up chunks of layer 2


def _file_mapped_at(address: int) -> str:
    """The file this process has mapped at ``address`` ('' for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else ""
    return ""


def test_experts_stored_in_one_chunk_per_layer_are_loaded_once(tmp_path):
    """Our torch_dist output keeps a layer's experts in one chunk; reading each expert must not reload it."""
    from checkpoint_convert.formats.megatron_formats import open_megatron_tree

    model = tiny_mixtral(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "dist", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist") == 0
    tree = open_megatron_tree(tmp_path / "dist")
    loads = []
    original = tree._load_chunk
    tree._load_chunk = lambda fqn, entry, chunk: (loads.append(tuple(chunk.offsets)), original(fqn, entry, chunk))[1]
    experts = [tree.tensor(None, f"mlp.experts.local_experts.{e}.linear_fc2.weight", 1) for e in range(4)]
    assert loads == [(1, 0, 0, 0)]
    expected = model.model.layers[1].mlp.experts.down_proj  # (experts, hidden, ffn), as Megatron's fc2
    assert all(torch.equal(tensor, expected[e].detach().to(tensor.dtype)) for e, tensor in enumerate(experts))
