"""How a conversion's output files are divided among processes (``checkpoint_convert/run/shares.py``), from plans alone."""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_convert.run.converter import Options, open_source, plan_conversion
from checkpoint_convert.run.dry_run import as_text, plan_report
from checkpoint_convert.formats.hf_io import tensor_nbytes
from checkpoint_convert.run.shares import output_files, source_bytes, split_outputs
from tests.family_kit import VARIANTS
from tests.helpers import convert


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shares") / "hf"
    next(variant for variant in VARIANTS if variant.name == "llama_gqa_untied").build(path)
    return path


def _plan(source: Path, **options):
    options = Options(load_path=source, save_path=source.parent / "out", **options)
    return plan_conversion(options, open_source(options), None)


def test_each_process_writes_whole_pipeline_ranks_and_reads_each_tensor_once(llama):
    """TP2 PP4 on four processes: the two TP files of a pipeline rank read the same tensors, so they go together."""
    split = split_outputs(_plan(llama, to="megatron", tensor_parallel=2, pipeline_parallel=4), 4)
    pipeline_ranks = [{file.pp for file in split.files(process)} for process in range(4)]
    assert sorted(map(sorted, pipeline_ranks)) == [[0], [1], [2], [3]]
    assert all(len(split.files(process)) == 2 for process in range(4))
    assert split.duplicated == 0 and all(len(readers) == 1 for readers in split.item_readers)


def test_one_pipeline_rank_is_split_by_file_when_that_is_faster(llama):
    """TP2 PP1 on two processes: one process writing both files costs more than both reading everything."""
    plan = _plan(llama, to="megatron", tensor_parallel=2)
    split = split_outputs(plan, 2)
    assert [len(split.files(process)) for process in range(2)] == [1, 1]
    assert all(readers == {0, 1} for readers, item in zip(split.item_readers, plan.items))
    assert split.duplicated == sum(source_bytes(plan)) and split.read == (split.duplicated, split.duplicated)
    assert split.written[0] == split.written[1] == plan.nbytes // 2


def test_shards_are_balanced_by_bytes(tmp_path, llama):
    """Hugging Face shards: the busiest process writes at most one shard more than the least busy."""
    ranks = tmp_path / "tp1"
    assert convert("--load_path", llama, "--save_path", ranks, "--to", "megatron") == 0
    plan = _plan(ranks, to="hf", max_shard_size="100KB")
    split = split_outputs(plan, 3)
    shards: dict[str, int] = {}
    for (file, _), size in zip(output_files(plan), _sizes(plan)):
        shards[file] = shards.get(file, 0) + size
    assert len(shards) > 6 and set(split.owner) == set(shards) and sum(split.written) == plan.nbytes
    assert max(split.written) - min(split.written) <= max(shards.values())
    assert split_outputs(plan, 3) == split  # every process computes the same split


def _sizes(plan) -> list[int]:
    return [tensor_nbytes(shape, dtype) for _, _, shape, dtype in plan.by_item]


def test_torch_dist_chunks_are_read_once(llama):
    """torch_dist: every process streams into a data file of its own, so every chunk goes where it balances best."""
    plan = _plan(llama, to="megatron", megatron_ckpt_format="torch_dist")
    split = split_outputs(plan, 3)
    assert split.duplicated == 0 and sorted(set(split.entry_owner)) == [0, 1, 2]
    assert max(split.written) - min(split.written) <= max(_sizes(plan))


def test_a_dry_run_under_torchrun_shows_what_each_process_would_do(llama, monkeypatch):
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    report = plan_report(Options(load_path=llama, save_path=llama.parent / "dry", to="megatron", tensor_parallel=2,
                                 pipeline_parallel=4))
    assert [share["files"] for share in report["processes"]] == [2, 2, 2, 2]
    assert sum(share["bytes_written"] for share in report["processes"]) == report["tensor_bytes"]
    assert "process 3: 2 files" in as_text(report) and not (llama.parent / "dry").exists()
