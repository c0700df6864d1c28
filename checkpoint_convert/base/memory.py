"""Keep memory bounded while reading memory-mapped checkpoints.

Pages of a memory-mapped file count towards the process's resident memory once they are read, and
stay resident until the mapping goes away, so reading a 140 GB checkpoint through ``mmap`` would
make the process look (and, under memory pressure, behave) 140 GB large. After a source tensor has
been converted and written, its pages are handed back:

- pages of a file mapping the current conversion only reads (``note_file_mapping``) are
  unmapped with ``MADV_DONTNEED``; they stay in the page cache, as after ``cp``, and come back from
  the file if touched again;
- any other memory gets ``MADV_PAGEOUT``, which loses nothing, so it is safe on every tensor; on a
  file's pages it also evicts them from the page cache, which made the kernel reclaim, and later
  re-read from disk, what it had just read (7% of a conversion's samples).
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import math
import mmap
import os
import sys
from typing import Iterator

import torch

MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux >= 5.4
_PAGE = mmap.PAGESIZE


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _madvise()


# sorted (start, end, path, file offset of start); None outside a scope
_read_only_file_mappings: list[tuple[int, int, str, int]] | None = None


@contextlib.contextmanager
def read_only_file_mappings() -> Iterator[None]:
    """A scope (one conversion) during which ``note_file_mapping`` registrations hold.

    A registration is only valid while its mapping exists; sources keep their files mapped until
    they are dropped, so the registrations end with the scope the source lives in, before an address
    could be reused for memory that ``MADV_DONTNEED`` would wipe.
    """
    global _read_only_file_mappings
    outer, _read_only_file_mappings = _read_only_file_mappings, []
    try:
        yield
    finally:
        _read_only_file_mappings = outer


def note_file_mapping(path: str | os.PathLike) -> None:
    """Register this process's current mappings of ``path``; the caller promises never to write them.

    Addresses come from ``/proc/self/maps``, so a mapping made by a library (``torch.load(mmap=True)``)
    can be registered too. Outside a ``read_only_file_mappings`` scope this does nothing.
    """
    if _MADVISE is None or _read_only_file_mappings is None:
        return
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            bisect.insort(_read_only_file_mappings, (start, end, target, int(fields[2], 16)))


def map_for_reading(path: str | os.PathLike) -> mmap.mmap:
    """A private (copy-on-write) map of the whole file, registered as read-only for this scope.

    Tensors made on it with ``torch.frombuffer`` are writable views that never write back to the
    file, read only when touched, and released with ``MADV_DONTNEED`` after they are converted.
    """
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    note_file_mapping(path)
    return mapping


def _read_only_file_mapping(start: int, end: int) -> tuple[int, int, str, int] | None:
    """The registered mapping holding the addresses ``start`` to ``end``, if any."""
    if not _read_only_file_mappings:
        return None
    index = bisect.bisect_right(_read_only_file_mappings, (start, float("inf"))) - 1
    found = _read_only_file_mappings[index] if index >= 0 else None
    return found if found is not None and found[1] >= end else None


def _in_read_only_file_mapping(start: int, end: int) -> bool:
    return _read_only_file_mapping(start, end) is not None


def file_region(tensor: torch.Tensor) -> tuple[str, int] | None:
    """(path, offset) of the file bytes a contiguous tensor is a view of, or None.

    Only for registered read-only mappings (``note_file_mapping``): nothing wrote to them, so the
    file holds exactly the tensor's bytes and a writer may copy them file to file, in the kernel.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.nbytes == 0:
        return None
    start = tensor.data_ptr()
    mapping = _read_only_file_mapping(start, start + tensor.nbytes)
    return None if mapping is None else (mapping[2], mapping[3] + start - mapping[0])


def shares_storage(tensor: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in ``source``'s storage (a view of it): releasing the source's pages
    then costs ``tensor`` its pages too, where a copy would have its own."""
    storage = source.untyped_storage()
    start = storage.data_ptr()
    return start <= tensor.untyped_storage().data_ptr() < start + max(storage.nbytes(), 1)


def release_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages under a CPU tensor's storage back to the kernel (no-op where unsupported)."""
    if _MADVISE is None or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start, length = storage.data_ptr(), storage.nbytes()
    first = (start + _PAGE - 1) // _PAGE * _PAGE  # only pages wholly inside this storage
    last = (start + length) // _PAGE * _PAGE
    if last > first:
        advice = MADV_DONTNEED if _in_read_only_file_mapping(first, last) else MADV_PAGEOUT
        _MADVISE(first, last - first, advice)


def release_file_pages(tensor: torch.Tensor) -> None:
    """Unmap the whole pages under a contiguous tensor's own bytes, if a registered read-only file maps them.

    For a pass that reads a large mapped tensor once, block by block (verify's comparison): each
    block's pages go back as soon as it is read, so the pass holds a block, not the tensor. Only
    file pages are handed back, which come back from the page cache if touched again; any other
    memory is left alone (``release_pages`` would page it out, a loss of time for memory that is
    freed anyway when its tensor goes).
    """
    if _MADVISE is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    first = (start + _PAGE - 1) // _PAGE * _PAGE
    last = (start + tensor.nbytes) // _PAGE * _PAGE
    if last > first and _in_read_only_file_mapping(first, last):
        _MADVISE(first, last - first, MADV_DONTNEED)


class Arena:
    """Memory handed out again for every family-table entry, to a pass that drops an entry's tensors first.

    Fresh memory is paid for at first touch: a page fault and a zeroed page per page, and on a
    virtual machine whose kernel reports freed pages to its host, the host backing every page again.
    Copying cached file pages into fresh memory ran at 0.5 GB/s on the 2-core test machine, into
    memory touched before at 2.5 GB/s. A pass that is done with an entry's tensors before it asks
    for the next entry (verify) takes its merges from here: its memory is the largest entry's,
    touched once. A conversion, whose outputs are written behind, must not.
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._used = 0

    def next_entry(self) -> None:
        """Every tensor handed out so far is dead: their memory is handed out again."""
        self._used = 0

    def empty(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena, valid until ``next_entry``."""
        start = -(-self._used // 64) * 64  # aligned for any dtype
        nbytes = math.prod(shape) * dtype.itemsize
        if start + nbytes > self._buffer.numel():
            self._buffer = torch.empty(start + nbytes, dtype=torch.uint8)  # views already handed out keep the old one
        self._used = start + nbytes
        return self._buffer[start:start + nbytes].view(dtype).view(shape)


M_MMAP_THRESHOLD = -3


def return_large_allocations_to_the_system() -> None:
    """Serve allocations of 1 MiB and more with their own mappings, unmapped when freed.

    glibc raises its mmap threshold after large blocks are freed, after which big tensors come from
    the heap and their memory is kept by the process: a conversion, which allocates and frees one
    large tensor after another, would grow to the sum of its largest tensors. A fixed threshold
    keeps the resident size at what is alive.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass
