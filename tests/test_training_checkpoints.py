"""Megatron checkpoints as training runs write them (``tests/training_run.py``) convert safely and correctly.

Each source carries what a real run stores beside the weights: Transformer Engine extra state (an
``io.BytesIO`` as TE < 1.13 wrote it, or a ``uint8`` tensor), FP8 training args, per-rank RNG state,
optimizer state in the rank file or, with the distributed optimizer, in ``distrib_optim.pt`` beside it,
and several ``iter_*`` directories with the tracker naming the latest. Each converts without
``--trust_checkpoint`` to Hugging Face and to a reshaped Megatron tree, with the original's logits
(megatron-core computes the reshaped tree's). torch_dist training checkpoints saved by megatron-core, with
sharded optimizer and RNG entries, are in ``tests/test_torch_dist.py``.
"""
from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch

from tests.helpers import assert_logits_close, convert, logits_of, plain_torch_allowlist
from tests.test_errors import snapshot
from tests.test_llama import tiny_llama
from tests.test_mixtral import tiny_mixtral
from tests.training_run import as_training_run, te_extra_state

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -r requirements-dev.txt)")

# name: (model, layout it was trained with, extra-state form, distributed optimizer, reshaped layout, (tp, ep))
RUNS = {
    "llama_tp2_te_bytesio": (tiny_llama, ["--target_tensor_model_parallel_size", "2"], "bytesio", False,
                             ["--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "2"],
                             (1, 1)),
    "mixtral_pp2_ep2_te_uint8_distributed_optimizer": (
        tiny_mixtral, ["--target_pipeline_model_parallel_size", "2", "--target_expert_model_parallel_size", "2"],
        "uint8", True, ["--target_pipeline_model_parallel_size", "1", "--target_tensor_model_parallel_size", "2",
                        "--target_expert_model_parallel_size", "1"], (2, 1)),
}


@pytest.fixture(autouse=True)
def without_megatron_safe_globals():
    with plain_torch_allowlist():
        yield


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """``name -> (checkpoint directory, Hugging Face model of its latest iteration)``, each built once."""
    built = {}

    def make(name):
        if name not in built:
            maker, layout, form, distributed_optimizer, _, _ = RUNS[name]
            root = tmp_path_factory.mktemp(name)
            model = maker(root / "hf")
            assert convert("--load_path", root / "hf", "--save_path", root / "converted", "--to", "megatron",
                           "--transformer_impl", "transformer_engine", *layout) == 0
            as_training_run(root / "converted", root / "run", [100, 200], form, distributed_optimizer)
            built[name] = root / "run", model
        return built[name]
    return make


@pytest.mark.parametrize("name", list(RUNS))
def test_training_checkpoint_converts_to_hf_without_trusting_it(tmp_path, training_run, capsys, name):
    source, model = training_run(name)
    before = snapshot(source)
    assert convert("--load_path", source, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert "error" not in capsys.readouterr().err
    assert_logits_close(logits_of(tmp_path / "hf"), logits_of(model))
    assert snapshot(source) == before


@pytest.mark.parametrize("name", list(RUNS))
def test_training_checkpoint_reshaped_runs_in_megatron_core(tmp_path, training_run, name):
    from tests.test_megatron_core import ATOL, megatron_core_logits

    source, model = training_run(name)
    *_, reshaped, (tp, ep) = RUNS[name]
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron", *reshaped) == 0
    state = torch.load(next((tmp_path / "m" / "release").glob("mp_rank_*/model_optim_rng.pt")), weights_only=False)
    assert state["args"].fp8 == "hybrid" and state["args"].fp8_amax_history_len == 16  # training settings carried
    assert all(value is None for key, value in state["model"].items() if key.endswith("_extra_state"))
    assert_logits_close(megatron_core_logits(tmp_path / "m", tmp_path, tp=tp, ep=ep), logits_of(model), atol=ATOL)


def test_inspect_shows_extra_state_with_its_size(training_run, capsys):
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    source, _ = training_run("llama_tp2_te_bytesio")
    rank_files = sorted((source / "iter_0000200").glob("mp_rank_*/model_optim_rng.pt"))
    stored = {}  # what the run stored, read by a full (trusted) unpickle
    for file in rank_files:
        for key, value in torch.load(file, weights_only=False)["model"].items():
            if key.endswith("_extra_state") and value is not None:
                stored[key] = stored.get(key, 0) + len(value.getvalue())
    assert run_inspect_cli([str(source), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["extra_state"]}
    attention = rows["decoder.layers.3.self_attention.core_attention._extra_state"]
    assert attention["form"] == ["io.BytesIO"] and attention["held_by"] == ["mp_rank_00", "mp_rank_01"]
    assert {name: row["bytes"] for name, row in rows.items() if row["form"] == ["io.BytesIO"]} == stored
    assert rows["output_layer._extra_state"]["form"] == ["None"]
    assert run_inspect_cli([str(source)]) == 0
    text = capsys.readouterr().out
    assert f"extra state (not converted, never unpickled): {len(rows)} entries" in text
    line = next(line for line in text.splitlines() if "decoder.layers.0.mlp.linear_fc1._extra_state" in line)
    assert "io.BytesIO" in line and f"{stored['decoder.layers.0.mlp.linear_fc1._extra_state']:,}" in line


def test_bytesio_extra_state_is_kept_as_bytes_and_never_unpickled(tmp_path):
    """The inner pickle would run a command if unpickled: loading keeps its bytes and runs nothing."""
    from checkpoint_convert.formats.safe_load import safe_torch_load

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    hostile = pickle.dumps(Payload())
    torch.save({"model": {"linear_qkv._extra_state": io.BytesIO(hostile),
                          "linear_fc1._extra_state": te_extra_state("bytesio", fp8=True, seed=1)}}, tmp_path / "m.pt")
    loaded = {key: _bytes_of(value) for key, value in safe_torch_load(tmp_path / "m.pt")["model"].items()}
    assert loaded["linear_qkv._extra_state"] == hostile and not (tmp_path / "pwned").exists()
    assert loaded["linear_fc1._extra_state"].startswith(b"PK")  # a torch.save zip of the FP8 scales


def _bytes_of(value) -> bytes:
    from checkpoint_convert.formats.safe_load import InertBytes

    assert isinstance(value, InertBytes), type(value)
    return value.data


def test_other_inert_data_megatron_stores_loads_safely(tmp_path):
    """Paths, attribute bags and RNG generators (a graph-safe RNG tracker's) load; nothing else is built."""
    import argparse
    import pathlib
    import types

    from checkpoint_convert.formats.safe_load import ForeignObject, safe_torch_load

    args = argparse.Namespace(data_cache_path=pathlib.PosixPath("/data/cache"), config=types.SimpleNamespace(a=1))
    torch.save({"args": args, "rng_state": [{"rng_tracker_states": {"model-parallel-rng": torch.Generator()}}]},
               tmp_path / "m.pt")
    loaded = safe_torch_load(tmp_path / "m.pt")
    assert loaded["args"].data_cache_path == pathlib.PosixPath("/data/cache") and loaded["args"].config.a == 1
    generator = loaded["rng_state"][0]["rng_tracker_states"]["model-parallel-rng"]
    assert isinstance(generator, ForeignObject) and generator.original_name == "torch._C.Generator"
