"""Signals that stop a run: SIGTERM and SIGHUP end it as Ctrl-C (SIGINT) does.

Python turns SIGINT into ``KeyboardInterrupt``, which unwinds the run: the staging directory is removed on the
way out and the command prints one line and exits 130. SIGTERM (what Slurm, Kubernetes, ``timeout`` and
torchrun send to stop a job) and SIGHUP (a closed terminal or SSH session) would otherwise end the process at
once, leaving a hidden staging directory as large as the output written so far. Here they raise
:class:`Stopped`, a ``KeyboardInterrupt``, so they take the very same path; the exit code is 128 + the signal's
number, as a shell reports a process that the signal ended. A second signal of the same kind ends the process
at once (the default action), for a user who does not want to wait for the cleaning up.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived (SIGTERM or SIGHUP); unwinds the run as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signal(signum: int, frame: Any) -> None:
    """The handler of :data:`STOP_SIGNALS`: raise :class:`Stopped` in the main thread."""
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    raise Stopped(signum)


def interruption(error: KeyboardInterrupt) -> tuple[str, int]:
    """The one line and the exit code of a run that ``error`` (Ctrl-C, or a stop signal) ended."""
    if isinstance(error, Stopped):
        return f"stopped by {error}; no output was left behind", 128 + error.signum
    return "interrupted; no output was left behind", 128 + signal.SIGINT


def install() -> dict[int, Any]:
    """Make every stop signal raise :class:`Stopped`; the previous handlers, for :func:`restore`. Only the main
    thread can set handlers: elsewhere (a library calling us from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, stop_on_signal) for signum in STOP_SIGNALS}


def ignore() -> None:
    """Ignore the stop signals from now on (a process that must finish saying why it ends)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced, unless :func:`ignore` was called meanwhile: a process that
    failed under torchrun keeps ignoring the SIGTERM torchrun sends the survivors, so that it ends with the code
    every process agreed on."""
    for signum, handler in previous.items():
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` (see the module docstring)."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)
