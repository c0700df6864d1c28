"""Start-up and exit costs of a one-shot command-line process, kept off the conversion's wall time.

This module imports neither torch nor transformers: the scripts use it before importing them.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
from typing import Any, Iterator, NoReturn, TextIO


def tune_torch_for_streaming() -> None:
    """Settings for a process that copies gigabytes through short torch kernels; before torch's import.

    Each is only a default: a value the user set in the environment wins.

    - ``OMP_WAIT_POLICY=PASSIVE``: torch's intra-op threads spin after every parallel kernel; a
      conversion runs thousands of short kernels between file writes, so the spinning took a core's
      worth of time (14% of all samples) away from the kernel's page-cache work.
    - ``THP_MEM_ALLOC_ENABLE=1``: torch backs CPU tensors of 2 MB and more with transparent huge
      pages. Every merged or stacked tensor is fresh memory, and faulting it in 4 KB pages made
      stacking experts run at 1.9 GB/s; with huge pages, 2.7-3.1 GB/s. Only where the kernel allows
      them on request (torch warns when the request fails).
    - ``OPENBLAS_NUM_THREADS=1``: numpy, which torch imports, starts OpenBLAS threads that spin
      after start-up (1.5% of a conversion's samples); a conversion does no linear algebra.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if _huge_pages_on_request():
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _huge_pages_on_request() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block of heavy imports, then exempt what they made.

    Importing torch and transformers' config classes creates some 10^5 long-lived objects; the
    collector, triggered by those allocations, traverses them again and again (0.2 s of torch's
    import, 0.6 s of transformers'). Merely pausing it moves that work to the first collections
    after the block (0.3 to 0.5 s of a conversion, inside the stream), so the block's survivors are
    frozen (``gc.freeze``): module-level objects that live as long as the process, never scanned
    again. Imports make little cyclic garbage, so little is kept that a collection would free.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def transformers_attr(name: str) -> Any:
    """``transformers.<name>``, imported when first needed: Megatron-only runs never pay for it.

    Only a first use imports, under :func:`collector_paused`; later uses take the attribute the lazy
    module kept, and freeze nothing (a freeze then would keep whatever cyclic garbage is pending).
    """
    loaded = sys.modules.get("transformers")
    if loaded is not None and name in vars(loaded):
        return vars(loaded)[name]
    with collector_paused():
        return getattr(importlib.import_module("transformers"), name)


EXIT_READER_GONE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away


def reader_gone() -> int:
    """stdout's reader went away (``... | head``): end quietly, as Unix tools do, with 128 + SIGPIPE.

    Python turns SIGPIPE into ``BrokenPipeError``; stdout is pointed at ``/dev/null`` so that no later
    flush (at exit) fails again and prints a second complaint.
    """
    _to_devnull(sys.stdout)
    return EXIT_READER_GONE


def silence_output() -> TextIO:
    """Send this process's stdout and stderr (Python's and the libraries') to ``/dev/null`` from now on; returns
    the stderr it had, for a line it must still print."""
    sys.stdout.flush()
    sys.stderr.flush()
    voice = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding=sys.stderr.encoding, errors="backslashreplace")
    _to_devnull(sys.stdout, sys.stderr)
    return voice


def _to_devnull(*streams: Any) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in streams:
        os.dup2(devnull, stream.fileno())
    os.close(devnull)


def exit_now(code: int) -> NoReturn:
    """End a finished command at once, skipping interpreter teardown.

    Every output file is closed and renamed into place before a command returns its exit code;
    what remains is freeing torch's and transformers' modules one object at a time, 0.6 to 1.5 s
    on a 2-core machine, for nothing.
    """
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = reader_gone()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
