"""A conversion stopped by the signals schedulers and terminals send (SIGTERM, SIGHUP), in one process and under
torchrun: real processes, real signals. Each run converts a 0.26 GB model, long enough to be stopped while it
writes; the signal goes out once the first rank file is being written into the staging directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_torchrun import _workers

CONVERT = REPO / "scripts" / "convert.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 0.26 GB bf16 Llama-shaped model (what is in it does not matter here)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import Shapes, build_synthetic

    path = tmp_path_factory.mktemp("run_safety") / "hf"
    build_synthetic(path, Shapes(hidden=1024, ffn=2816, heads=8, groups=4, vocab=32000), layers=6)
    return path


def start(model: Path, out: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    """The conversion of ``model`` to Megatron TP 2 into ``out``, started in the background."""
    command = [*(launcher or [sys.executable]), str(CONVERT), "--load_path", str(model), "--save_path", str(out),
               "--to", "megatron", "--target_tensor_model_parallel_size", "2", "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_until_writing(out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.parent.glob(f".{out.name}.partial-*/release/*/*")):
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.005)


def leftovers(out: Path) -> list[str]:
    """What the run left beside (or as) its save path."""
    return sorted(path.name for path in out.parent.iterdir() if path.name == out.name
                  or path.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_leaves_nothing_and_says_so(model, tmp_path, signum):
    before = {path: path.stat().st_mtime_ns for path in model.iterdir()}
    run = start(model, tmp_path / "out")
    wait_until_writing(tmp_path / "out")
    run.send_signal(signum)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [f"stopped by {signal.Signals(signum).name}; no output was left behind"], stderr
    assert leftovers(tmp_path / "out") == []
    assert {path: path.stat().st_mtime_ns for path in model.iterdir()} == before


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's processes in /proc")
def test_sigterm_to_torchrun_stops_every_process(model, tmp_path):
    """SIGTERM to torchrun (what Kubernetes sends a job's first process, and Slurm a job step): torchrun sends it on to
    every process, each stops at its next tensor, one line says so, and the staging directory is gone."""
    run = start(model, tmp_path / "out", TORCHRUN)
    wait_until_writing(tmp_path / "out")
    workers = _workers(run.pid)
    assert len(workers) == 2
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith(("stopped by", "error:", "internal error:"))]
    assert lines == ["stopped by SIGTERM; no output was left behind"], stderr[-3000:]
    assert leftovers(tmp_path / "out") == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers.values())
