"""One conversion split across the processes ``torchrun`` starts (``torch.distributed``, gloo, CPU only).

Started by ``torchrun`` with more than one process (``WORLD_SIZE`` > 1), every process opens the source and
plans the whole conversion, the same on all of them, then writes the output files ``shares`` gives it,
streaming as one process does; without torchrun, :class:`Solo` changes nothing. All processes write into one
hidden staging directory, which process 0 (the leader) makes beside the save path: the save path must be on a
filesystem every process sees.

The processes meet three times, each meeting a barrier followed by an exchange of what each has to report:
after planning (the leader hands out the staging directory), once every tensor file is written (each hands
the leader what it needs for the files beside them: ``torch_dist``'s chunk records, its warnings, its peak
memory), and once the leader has written those files and renamed the staging directory into place, tracker
last. A failure anywhere (bad input, a full disk, a signal) makes that process report at the next meeting
instead, after setting a flag in torchrun's key-value store that makes the others stop at their next tensor;
then every process learns the failure, the leader prints one line (the first process's own failure; the
others' output is silenced by the command line), removes the staging directory, and every process exits
with that line's code. A process that dies (SIGKILL) breaks gloo's connections: the others notice at once,
remove the staging directory and exit with one line. A process that hangs, or a machine that goes away, is
noticed when no process has written anything for ``timeout`` minutes.

A thread in every process adds its bytes written to a counter in the store twice a second; the leader's
progress bar shows the sum, for the whole conversion.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from ..base.distribution import tool_version
from ..base.errors import EXIT_INTERNAL, BadInputError, ProcessesFailed, internal_error_line
from . import stop_signals
from .output import new_staging, put_in_place, staged_directory
from .plan import DEFAULT_TIMEOUT_MINUTES, Plan, Share, Summary
from .shares import Split, split_outputs

_LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
_SYNC_SECONDS = 0.5
_POLL_SECONDS = 0.05
_NO_TIMEOUT = timedelta(days=365)  # a barrier waits as long as some process makes progress (``Team._wait_for_all``)
_BYTES, _FAILED, _REPORTER = "bytes", "failed", "reporter"


def launched() -> tuple[int, int] | None:
    """(this process's rank, the number of processes) when a launcher such as torchrun started more than one."""
    if not all(os.environ.get(name) for name in _LAUNCHER_ENV):
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    return (rank, world) if world > 1 else None


def follower() -> bool:
    """Whether this is one of several processes of a conversion, other than the leader (rank 0)."""
    return (launched() or (0, 1))[0] != 0


class Solo:
    """The one process of a conversion run without torchrun: everything is its share."""

    leader = alone = True

    def __enter__(self) -> Solo:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def share(self, plan: Plan) -> Share:
        return Share(self, plan.by_item, plan.items)

    def staged_directory(self, save_path: Path, needed_bytes: int) -> contextlib.AbstractContextManager[Path]:
        return staged_directory(save_path, needed_bytes)

    def progress(self, total: int, quiet: bool) -> tqdm:
        return _bar(total, quiet)

    def check(self) -> None:
        return None

    def all_written(self, part: Any) -> list[Any]:
        return [part]

    def summarized(self, summary: Summary) -> Summary:
        return summary


def _bar(total: int, quiet: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet, desc="converting",
                dynamic_ncols=True)


def processes_of_this_run(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Solo | Team:
    """The processes converting together: a :class:`Team` under torchrun, else :class:`Solo`."""
    placed = launched()
    return Team(*placed, timeout_minutes) if placed else Solo()


@dataclass(frozen=True)
class _Report:
    """What a failed process tells the others: its error line, exit code, and whether it is a cause (not merely
    the consequence of another process's failure)."""

    line: str
    code: int
    cause: bool = True


class _AnotherFailed(Exception):
    """Another process failed (a consequence, reported as such)."""


def _report_of(error: BaseException) -> _Report:
    if isinstance(error, BadInputError):
        return _Report(f"error: {error}", 2)
    if isinstance(error, _AnotherFailed):
        return _Report("error: another conversion process failed", EXIT_INTERNAL, cause=False)
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or a stop signal (torchrun stops the others when one fails)
        return _Report(*stop_signals.interruption(error))
    return _Report(internal_error_line(error), EXIT_INTERNAL)


@dataclass
class _Progress:
    """This process's bytes, shared through the store by a thread; the leader's bar shows every process's sum."""

    store: Any
    leader: bool
    written: int = 0
    pushed: int = 0
    total: int = 0
    last_change: float = field(default_factory=time.monotonic)
    bar: tqdm | None = None
    another_failed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, name="progress-share", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(_SYNC_SECONDS):
            try:
                self.sync()
            except Exception:  # the store (torchrun's agent) went away: the run cannot finish
                self.another_failed.set()
                return

    def sync(self) -> None:
        """Add this process's new bytes to the shared counter; note the others' progress and failures."""
        with self._lock:
            written = self.written
            total = self.store.add(_BYTES, written - self.pushed)
            self.pushed = written
            if total != self.total:
                self.total, self.last_change = total, time.monotonic()
            if self.store.check([_FAILED]):
                self.another_failed.set()
            if self.bar is not None:
                self.bar.update(total - self.bar.n)

    def update(self, nbytes: int) -> None:
        self.written += nbytes

    def set_description(self, text: str, refresh: bool = False) -> None:
        if self.bar is not None:
            self.bar.set_description(text, refresh=refresh)


class Team:
    """This process among the ``world`` processes torchrun started for one conversion (see the module docstring)."""

    alone = False

    def __init__(self, rank: int, world: int, timeout_minutes: float) -> None:
        self.rank, self.world = rank, world
        self.leader = rank == 0
        self.timeout = timedelta(minutes=timeout_minutes)
        self.broken = False  # a meeting failed (a process died): no further collective
        self.settled: BaseException | None = None  # the failure every process agreed on
        self.done = False  # the output is in place
        self.progress_shared: _Progress | None = None
        self.split: Split | None = None
        self.plan_digest = ""
        self.peaks_mb: list[float] = []
        self._warnings: list[warnings.WarningMessage] = []
        self._warned: list[tuple[str, type]] = []  # the followers' warnings, for the leader

    def __enter__(self) -> Team:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=self.timeout)
        self.progress_shared = _Progress(self._store(), self.leader)
        self.progress_shared.start()
        self._fail_store = self._store()
        self._previous_handlers = stop_signals.install()
        self._catching = warnings.catch_warnings(record=True)
        self._warnings = self._catching.__enter__()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> None:
        import torch.distributed as dist

        try:
            if error is not None:
                raise self.failed(error) from None
        finally:
            self.progress_shared.stop()
            if self.settled is None:  # a failed process keeps ignoring stop signals until it has said why it ends
                stop_signals.restore(self._previous_handlers)
            self._catching.__exit__(None, None, None)
            if error is None:
                self._emit_warnings()  # a failed run's warnings are about an output that was never made
            if not self.broken:
                dist.destroy_process_group()

    def _store(self) -> Any:
        """A client of torchrun's key-value store, under this run's own prefix."""
        import torch.distributed as dist

        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=self.timeout)
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return dist.PrefixStore(f"megatron-hf-convert/{run}/", client)

    def share(self, plan: Plan) -> Share:
        """This process's part of ``plan``: its files, the outputs that go there, the items they need."""
        split = self.split = split_outputs(plan, self.world)
        mine = [owner == self.rank for owner in split.entry_owner]
        by_item = [entry for entry, kept in zip(plan.by_item, mine) if kept]
        items = [item for item, readers in zip(plan.items, split.item_readers) if self.rank in readers]
        self.plan_digest = _digest(plan, split)
        return Share(self, by_item, items, split.files(self.rank), frozenset(entry[1] for entry in by_item),
                     self.rank)

    @contextlib.contextmanager
    def staged_directory(self, save_path: Path, needed_bytes: int) -> Iterator[Path]:
        """The leader's staging directory, shared by every process; renamed into place once all succeeded."""
        staging: Path | None = None
        try:
            made = new_staging(save_path, needed_bytes) if self.leader else None
            sent = self._meet(None, (made and str(made), self.plan_digest))
            staging = Path(sent[0][0])
            _check_same_conversion(staging, [digest for _, digest in sent])
            yield staging
            if self.leader:
                put_in_place(staging, save_path)
        except BaseException as error:
            failure = self.failed(error)
            if staging is not None and (self.leader or self.broken):
                shutil.rmtree(staging, ignore_errors=True)
            raise failure from None
        self._meet(None)
        self.done = True

    def progress(self, total: int, quiet: bool) -> contextlib.AbstractContextManager[_Progress]:
        """The stream's progress: counted here, shown (summed over every process) by the leader's bar."""
        shared = self.progress_shared
        if self.leader and shared.bar is None:
            shared.bar = _bar(sum(self.split.written), quiet)
        return contextlib.nullcontext(shared)

    def check(self) -> None:
        """Stop when another process has failed (before the next tensor)."""
        if self.progress_shared.another_failed.is_set():
            raise _AnotherFailed()

    def all_written(self, part: Any) -> list[Any] | None:
        """The second meeting: every process's ``part`` (and warnings and peak memory) to the leader."""
        self.progress_shared.sync()
        sent = [(str(w.message), w.category) for w in self._warnings]
        gathered = self._meet(None, (part, sent, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        self.peaks_mb = [peak for _, _, peak in gathered]
        if not self.leader:
            return None
        self.progress_shared.sync()
        self._warned = [message for _, sent, _ in gathered[1:] for message in sent]
        return [part for part, _, _ in gathered]

    def summarized(self, summary: Summary) -> Summary:
        """The whole conversion's summary: the largest peak memory of any process, and how the work was split."""
        summary.peak_rss_mb = max(self.peaks_mb, default=summary.peak_rss_mb)
        summary.split = self.split.summary() if self.split else ""
        return summary

    def failed(self, error: BaseException) -> BaseException:
        """The failure to raise for ``error``, once every process has learnt of it (the first process's cause)."""
        if self.settled is not None:
            return self.settled
        if self.done:  # the output is in place: nothing left to agree on
            return error
        report = _report_of(error)
        if not self.broken:
            with contextlib.suppress(Exception):
                self._fail_store.set(_FAILED, str(self.rank))  # the others stop at their next tensor
            with contextlib.suppress(ProcessesFailed):
                self._meet(report, error=error)
        return self._settle(self.settled or ProcessesFailed(report.line, report.code, error, self.leader))

    def _settle(self, failure: ProcessesFailed) -> ProcessesFailed:
        """Keep ``failure`` as the outcome; the process ends with it, so a SIGTERM torchrun sends now (another
        process has already ended with this failure) no longer interrupts the cleaning up."""
        self.settled = failure
        stop_signals.ignore()
        return failure

    def _meet(self, report: _Report | None, data: Any = None, error: BaseException | None = None) -> list[Any]:
        """Wait for every process, then exchange (report, data); raise the agreed failure if any reported one."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        try:
            self._wait_for_all()
            dist.all_gather_object(gathered, (report, data))
        except BaseException as broken:  # a process died or hung, or a signal came meanwhile
            self.broken = True
            what = (f"the conversion processes stopped making progress: {broken}" if isinstance(broken, TimeoutError)
                    else "a conversion process stopped without reporting (killed, or its machine lost)")
            raise self._settle(ProcessesFailed(f"error: {what}; no output was left behind", EXIT_INTERNAL, error,
                                               self._first_to_tell())) from None
        reports = [(rank, sent) for rank, (sent, _) in enumerate(gathered) if sent is not None]
        if reports:
            rank, chosen = next(((rank, sent) for rank, sent in reports if sent.cause), reports[0])
            raise self._settle(ProcessesFailed(chosen.line, chosen.code, error if rank == self.rank else None,
                                               self.leader))
        return [data for _, data in gathered]

    def _first_to_tell(self) -> bool:
        """Whether this process reports a broken meeting: the first survivor to ask the store (which torchrun's
        agent keeps), else the leader, so that one line is printed whichever process died."""
        try:
            return self._fail_store.add(_REPORTER, 1) == 1
        except Exception:  # the store went away with its machine
            return self.leader

    def _wait_for_all(self) -> None:
        """A barrier that waits as long as some process writes; gloo raises at once when a process died."""
        import torch.distributed as dist

        work = dist.barrier(async_op=True, timeout=_NO_TIMEOUT)
        since = time.monotonic()
        while not work.is_completed():
            quiet_for = time.monotonic() - max(since, self.progress_shared.last_change)
            if quiet_for > self.timeout.total_seconds():
                raise TimeoutError(f"none wrote anything for {quiet_for / 60:.1f} minutes (--distributed_timeout)")
            time.sleep(_POLL_SECONDS)
        work.wait()

    def _emit_warnings(self) -> None:
        """The leader warns once of each warning any process raised (the others' output is silenced)."""
        if not self.leader:
            return
        seen = dict.fromkeys([(str(w.message), w.category) for w in self._warnings] + self._warned)
        for message, category in seen:
            warnings.warn(message, category, stacklevel=2)


def _digest(plan: Plan, split: Split) -> str:
    """A fingerprint of what this process is about to do: the tool's version, every planned output, the split."""
    text = repr((tool_version(), [(key, tuple(shape), str(dtype)) for _, key, shape, dtype in plan.by_item],
                 split.entry_owner))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_same_conversion(staging: Path, digests: list[str]) -> None:
    """Every process must plan the same conversion, in the staging directory the leader made."""
    if not staging.is_dir():
        raise BadInputError("the save path's directory, made by process 0, is not here: every process must see "
                            "the same filesystem", staging)
    differing = [process for process, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise BadInputError(f"process {differing[0]} planned another conversion than process 0: every machine "
                            "needs the same version of this tool and the same source")


