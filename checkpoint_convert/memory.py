"""Keep memory bounded while reading memory-mapped checkpoints.

Pages of a memory-mapped file count towards the process's resident memory once they are read, and
stay resident until the mapping goes away, so reading a 140 GB checkpoint through ``mmap`` would
make the process look (and, under memory pressure, behave) 140 GB large. After a source tensor has
been converted and written, its pages are handed back with ``madvise(MADV_PAGEOUT)``: clean file
pages are dropped (re-read from the file if ever touched again), and nothing is lost for any other
memory, so the call is safe on every tensor.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import torch

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


def release_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages under a CPU tensor's storage back to the kernel (no-op where unsupported)."""
    if _MADVISE is None or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start, length = storage.data_ptr(), storage.nbytes()
    first = (start + _PAGE - 1) // _PAGE * _PAGE  # only pages wholly inside this storage
    last = (start + length) // _PAGE * _PAGE
    if last > first:
        _MADVISE(first, last - first, MADV_PAGEOUT)


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
