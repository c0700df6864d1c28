"""Write on a second thread while the next tensor is produced.

A conversion alternates between producing a tensor (page faults on the source mapping, merges,
casts: torch kernels) and writing it (the kernel copying it into the page cache). Both release the
GIL, so on two cores they overlap. Memory stays within the streaming budget because the producer
asks for room before it produces the next batch of tensors (``wait_for_room``): it waits until the
bytes still queued plus the batch's bytes fit in ``max_queued_bytes`` (the largest output tensor), or
until the writer is idle. So what is queued and what is being produced together hold no more than
before the writer had a thread of its own.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Hashable

import torch


class WriteBehind:
    """Runs ``write(key, tensor)`` and other queued calls in order, on one background thread."""

    def __init__(self, write: Callable[[Hashable, torch.Tensor], Any], max_queued_bytes: int) -> None:
        self._write = write
        self._limit = max_queued_bytes
        self._jobs: deque[tuple[Callable[..., Any], tuple, int]] = deque()
        self._queued_bytes = 0
        self._closing = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="write-behind", daemon=True)
        self._thread.start()

    def wait_for_room(self, nbytes: int) -> None:
        """Block until ``nbytes`` more fit in the queue (or nothing is queued); re-raise a write failure."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or self._queued_bytes == 0
                                   or self._queued_bytes + nbytes <= self._limit)
            if self._error is not None:
                raise self._error

    def submit(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Queue a tensor for writing (room for it is asked for with ``wait_for_room`` beforehand)."""
        with self._changed:
            self._enqueue(self._write, (key, tensor), tensor.nbytes)

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)`` to run after everything queued before it."""
        with self._changed:
            self._enqueue(function, args, 0)

    def _enqueue(self, function: Callable[..., Any], args: tuple, size: int) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.append((function, args, size))
        self._queued_bytes += size
        self._changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._jobs or self._closing)
                if not self._jobs or self._error is not None:
                    return
                function, args, size = self._jobs[0]
            try:
                function(*args)
            except BaseException as error:  # re-raised in the producing thread
                self._error = error
            with self._changed:
                self._jobs.popleft()
                self._queued_bytes -= size
                self._changed.notify_all()
            del function, args  # let the written tensor go before waiting for the next job

    def close(self, abandon: bool = False) -> None:
        """Wait for the queued jobs (or, with ``abandon``, only the running one); re-raise a failure."""
        with self._changed:
            if abandon:
                self._jobs = deque(list(self._jobs)[:1])
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        if self._error is not None and not abandon:
            raise self._error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> None:
        self.close(abandon=kind is not None)
