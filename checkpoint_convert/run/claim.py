"""One run per save path, and what a killed run left behind (output safety, with ``output``).

A run claims its save path before any work: it takes an exclusive ``flock`` on ``.NAME.lock`` beside the save
path and writes who it is (pid, host, start time) into that file. The kernel releases the lock when the process
ends, however it ends (SIGKILL included), so a claim never outlives its run; the file is removed when the run
ends normally or by a signal (a killed run leaves it, unlocked and harmless: the next run takes it over). A
second run on the same save path finds the lock taken and stops with one line naming the run that holds it.
Under torchrun, process 0 claims for every process. On a filesystem without locks the run goes on, with a
warning that concurrent runs are not kept apart.

Every staging directory carries a marker (:data:`MARKER`, removed just before the rename into place) naming
the run that made it. A run holding the claim names each ``.NAME.partial-*`` directory it finds (size, age,
and whether the process that made it still runs) and removes it only when it is certainly a dead run's of
this tool: the marker is there (so this tool made it), the claim is ours (so no run of this tool on this save
path still writes), and its process is gone (or on another host, whose run could not hold the claim we hold).
Anything else is left in place.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..base.errors import BadInputError

MARKER = ".megatron-hf-convert-staging.json"
_TOOL = "megatron-hf-convert"
_held: dict[Path, Run] = {}  # the save paths (resolved) this process has claimed
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True)
class Run:
    """Who runs a conversion: what a lock file and a staging marker record."""

    pid: int
    host: str
    started: float  # seconds since the epoch

    @classmethod
    def this(cls) -> Run:
        return cls(os.getpid(), socket.gethostname(), time.time())

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {started}"

    def alive(self) -> bool | None:
        """Whether its process still runs; None when it ran on another host (which cannot be asked)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True

    def record(self) -> bytes:
        return json.dumps({"tool": _TOOL, **asdict(self)}).encode()


def _read_run(data: bytes) -> Run | None:
    """The run a lock file or marker names; None when it is no record of this tool's."""
    try:
        fields = json.loads(data)
        if fields.pop("tool") != _TOOL:
            return None
        return Run(int(fields["pid"]), str(fields["host"]), float(fields["started"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def lock_file(save_path: Path) -> Path:
    save = save_path.resolve()
    return save.parent / f".{save.name}.lock"


@contextlib.contextmanager
def claimed(save_path: Path) -> Iterator[Run]:
    """Hold the save path for the whole block; refuses (one line) when another run holds it."""
    save = save_path.resolve()
    created = [parent for parent in (save.parent, *save.parent.parents) if not parent.exists()]
    try:
        save.parent.mkdir(parents=True, exist_ok=True)
        descriptor = _lock(lock_file(save), save_path)
    except BaseException:
        _remove_empty(created)
        raise
    me = Run.this()
    _held[save] = me
    try:
        if descriptor is not None:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, me.record(), 0)
        yield me
    finally:
        _held.pop(save, None)
        if descriptor is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_file(save))  # before unlocking: a run waiting on this file then tries again
            os.close(descriptor)
        _remove_empty(created)


def _lock(path: Path, save_path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock; None on a filesystem without locks."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise BadInputError(f"cannot make the lock file {path.name} beside the save path: {error.strerror}",
                                save_path) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_run(os.pread(descriptor, 4096, 0))
            os.close(descriptor)
            who = other.describe() if other else f"its lock file is {path}"
            raise BadInputError(f"another conversion is writing this save path ({who}); wait for it to end or "
                                "choose another save path", save_path) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in _NO_LOCKS:
                raise
            warnings.warn(f"{save_path}: its filesystem has no file locks; another conversion started on the same "
                          "save path at the same time would not be noticed")
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        os.close(descriptor)  # its holder removed the file as we opened it: lock the new one


def holder(save_path: Path) -> str | None:
    """Who holds ``save_path`` now (described), or None: asked without taking the claim or making a lock file
    (a dry run reports it as a problem; a lock file whose lock is free is a finished or killed run's)."""
    path = lock_file(save_path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_run(os.pread(descriptor, 4096, 0))
        return other.describe() if other else f"its lock file is {path}"
    except OSError:
        return None
    finally:
        os.close(descriptor)  # closing releases a lock taken here
    return None


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a claim made for its lock file, innermost first, when nothing else is in them."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def mark_staging(staging: Path) -> None:
    """Record in a new staging directory which run made it."""
    (staging / MARKER).write_bytes((_held.get(_save_of(staging)) or Run.this()).record())


def unmark_staging(staging: Path) -> None:
    """Remove the marker of a finished staging directory, just before it is renamed into place."""
    with contextlib.suppress(FileNotFoundError):
        (staging / MARKER).unlink()


def _save_of(staging: Path) -> Path:
    return staging.parent / staging.name[1:].rsplit(".partial-", 1)[0]


def clear_stale_staging(save_path: Path) -> None:
    """Name every staging directory an earlier run of ``save_path`` left (a warning each); remove those that are
    certainly a dead run's of this tool (see the module docstring)."""
    save = save_path.resolve()
    for stale in sorted(save.parent.glob(f".{save.name}.partial-*")):
        if stale.is_dir() and not stale.is_symlink():
            _name_or_remove(stale, save in _held)


def _name_or_remove(stale: Path, claim_held: bool) -> None:
    try:
        run = _read_run((stale / MARKER).read_bytes())
    except OSError:
        run = None
    what = f"{stale} ({_size(stale)}, last written {_age(stale)} ago)"
    if run is None:
        warnings.warn(f"{what} was left by a run that did not mark it (another program, or an older version of this "
                      "tool); left in place: remove it once nothing writes there")
        return
    alive = run.alive()
    if alive or not claim_held:
        state = "which still runs" if alive else "which may still run"
        warnings.warn(f"{what} belongs to the conversion of {run.describe()}, {state}; left in place")
        return
    shutil.rmtree(stale, ignore_errors=True)
    state = "ended" if alive is False else "holds no claim on the save path"
    warnings.warn(f"{what} was left by the conversion of {run.describe()}, which {state}; removed")


def _size(directory: Path) -> str:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.1f} MiB"


def _age(path: Path) -> str:
    seconds = max(0.0, time.time() - path.stat().st_mtime)
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
