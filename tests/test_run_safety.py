"""Runs that do not end well, with real processes and real signals: a conversion stopped by the signals schedulers
and terminals send (SIGTERM, SIGHUP), in one process and under torchrun; two runs on one save path; what a killed
run leaves, named and (when it is certainly a dead run's) removed by the next one. Each background run converts a
0.3 GB model, long enough to be stopped while it writes: the signal, or the second run, goes out once the first
rank file is being written into the staging directory."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_convert.run.claim import MARKER, Run, claimed
from checkpoint_convert.base.errors import BadInputError
from tests.family_kit import VARIANTS
from tests.helpers import REPO, convert
from tests.test_torchrun import _env, _leftovers, _workers, larger_model  # noqa: F401  (a fixture: a 0.3 GB model)

CONVERT = REPO / "scripts" / "convert.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def tiny(path: Path) -> Path:
    """A tiny Llama model, for a run that must only finish."""
    next(variant for variant in VARIANTS if variant.name == "llama_mha_tied").build(path)
    return path


def start(model: Path, out: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    """The conversion of ``model`` to Megatron TP 2 into ``out``, started in the background."""
    command = [*(launcher or [sys.executable]), str(CONVERT), "--load_path", str(model), "--save_path", str(out),
               "--to", "megatron", "--target_tensor_model_parallel_size", "2", "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())


def wait_until_writing(out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.parent.glob(f".{out.name}.partial-*/release/*/*")):
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.005)


def leftovers(out: Path) -> list[str]:
    """What the run left beside (or as) its save path."""
    return _leftovers(out.parent, out.name)


def claim_line(out: Path, pid: int) -> str:
    """The start of the line a run refused by the claim of process ``pid`` prints."""
    host = socket.gethostname()
    return f"error: {out}: another conversion is writing this save path (pid {pid} on host {host}, started "


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_leaves_nothing_and_says_so(larger_model, tmp_path, signum):
    before = {path: path.stat().st_mtime_ns for path in larger_model.iterdir()}
    run = start(larger_model, tmp_path / "out")
    wait_until_writing(tmp_path / "out")
    run.send_signal(signum)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [f"stopped by {signal.Signals(signum).name}; no output was left behind"], stderr
    assert leftovers(tmp_path / "out") == []
    assert {path: path.stat().st_mtime_ns for path in larger_model.iterdir()} == before


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's processes in /proc")
def test_sigterm_to_torchrun_stops_every_process(larger_model, tmp_path):
    """SIGTERM to torchrun (what Kubernetes sends a job's first process), which sends it on to every process: each
    stops at its next tensor, one line says so, the staging directory is gone. Meanwhile process 0 held the save
    path for every process."""
    out = tmp_path / "out"
    run = start(larger_model, out, TORCHRUN)
    wait_until_writing(out)
    workers = _workers(run.pid)
    assert len(workers) == 2
    with pytest.raises(BadInputError, match=re.escape(claim_line(out, workers[0])[len("error: "):])):
        with claimed(out):
            pass
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith(("stopped by", "error:", "internal error:"))]
    assert lines == ["stopped by SIGTERM; no output was left behind"], stderr[-3000:]
    assert leftovers(out) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers.values())


def test_two_runs_on_one_save_path_never_both_succeed(larger_model, tmp_path):
    """Started together: one converts, the other stops with one line naming it (or, when it comes too late to meet
    it, finds the output there)."""
    runs = [start(larger_model, tmp_path / "out") for _ in range(2)]
    stderrs = [run.communicate(timeout=120)[1] for run in runs]
    assert sorted(run.returncode for run in runs) == [0, 2], stderrs
    winner, loser = sorted(range(2), key=lambda index: runs[index].returncode)
    assert stderrs[loser].count("\n") == 1, stderrs[loser]
    assert stderrs[loser].startswith((claim_line(tmp_path / "out", runs[winner].pid),
                                      f"error: {tmp_path / 'out'}: save path is not empty")), stderrs[loser]
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert leftovers(tmp_path / "out") == ["out"]  # the lock file went with the run that held it


HOLDER = """import sys, time
from pathlib import Path
from checkpoint_convert.run.claim import claimed
with claimed(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's processes in /proc")
def test_a_held_save_path_stops_every_process_of_a_torchrun_run(larger_model, tmp_path):
    """A process holding the save path makes every process of a torchrun conversion stop with one line naming it
    (process 0 finds it held); once that process is killed, the operating system has released its lock and the
    next run converts."""
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = start(larger_model, held, TORCHRUN)
        stderr = refused.communicate(timeout=120)[1]
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert refused.returncode != 0 and stderr.count("exitcode  : 2") == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("stopped by", "error:", "internal error:"))]
    assert len(lines) == 1 and lines[0].startswith(claim_line(held, holder.pid)), stderr[-3000:]
    assert leftovers(held) == [".held.lock"]  # the killed holder's, no longer locked:
    assert convert("--load_path", tiny(tmp_path / "hf"), "--save_path", held, "--to", "megatron") == 0
    assert leftovers(held) == ["held"]


def test_a_killed_runs_staging_is_named_and_removed_only_when_dead(larger_model, tmp_path, capsys):
    """SIGKILL leaves a staging directory (and an unlocked lock file). The next run names every staging directory of
    its save path: the killed run's (marked, its process gone) is removed; one no run of this tool marked, and one
    whose process still runs, are left in place. Then it converts."""
    out = tmp_path / "out"
    killed = start(larger_model, out)
    wait_until_writing(out)
    killed.kill()
    killed.wait(timeout=60)
    stale = next(tmp_path.glob(".out.partial-*"))
    assert (stale / MARKER).is_file() and (tmp_path / ".out.lock").is_file()
    foreign = tmp_path / ".out.partial-foreign"
    foreign.mkdir()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".out.partial-living").mkdir()
        (tmp_path / ".out.partial-living" / MARKER).write_bytes(Run(living.pid, socket.gethostname(), time.time())
                                                                  .record())
        capsys.readouterr()
        assert convert("--load_path", tiny(tmp_path / "hf"), "--save_path", out, "--to", "megatron") == 0
    finally:
        living.kill()
    err = capsys.readouterr().err
    warned = {path: line for line in err.splitlines() for path in (stale, foreign, tmp_path / ".out.partial-living")
              if line.startswith(f"warning: {path} (")}
    assert len(warned) == 3 and err.count(".partial-") == 3, err
    assert " MiB, last written " in warned[stale] and warned[stale].endswith(
        f"was left by the conversion of pid {killed.pid} on host {socket.gethostname()}, started "
        f"{warned[stale].split(', started ')[1].split(',')[0]}, which ended; removed"), err
    assert warned[foreign].startswith(f"warning: {foreign} (0.0 MiB") and "did not mark it" in warned[foreign], err
    assert "left in place" in warned[foreign]
    assert warned[tmp_path / ".out.partial-living"].endswith(
        f"pid {living.pid} on host {socket.gethostname()}, started "
        f"{warned[tmp_path / '.out.partial-living'].split(', started ')[1].split(',')[0]}, which still runs; "
        "left in place"), err
    assert leftovers(out) == [".out.partial-foreign", ".out.partial-living", "out"]
    assert not (out / "release" / MARKER).exists() and not (out / MARKER).exists()
