"""Whole-tensor passes in bounded blocks: comparing two tensors, and concatenating mapped ones.

A cast and a subtraction of whole tensors allocate float32 copies of them: eight bytes per bf16
element of a 2 GB embedding is 16 GB for one comparison. Here a pair of blocks (views of up to
``BLOCK_ELEMENTS`` elements) of one dtype is compared byte for byte, in place. Only a pair that
differs, or whose dtypes differ, is compared in smaller pieces: widened to the wider dtype (which
is exact) and compared byte for byte again, then, where they still differ, subtracted in float32
(or the wider dtype if wider still).

Both passes call back after each block, so the caller can hand back the block's mapped file pages
(``memory.release_file_pages``): a pass over a memory-mapped tensor then holds a block of it.
"""
from __future__ import annotations

import ctypes
import math
import sys
from typing import Callable, Iterable, Iterator

import torch

BLOCK_ELEMENTS = 1 << 20  # 2 MB of bf16: few calls per gigabyte; compared in place, nothing allocated
# Blocks that must be widened or subtracted are done in pieces whose float32 temporaries (512 KB) stay
# below the size from which allocations are fresh mappings (``memory.return_large_allocations_to_the_system``).
PIECE_ELEMENTS = 1 << 17


def _memcmp() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_MEMCMP = _memcmp()  # several times faster than torch.equal on blocks (per-call overhead of its kernel)


def blocks(tensor: torch.Tensor, limit: int = BLOCK_ELEMENTS) -> Iterator[torch.Tensor]:
    """Views covering ``tensor`` in order, each of at most ``limit`` elements.

    Blocks are ranges of the first dimension, or of a sub-tensor's when one row is larger than
    ``limit``; two tensors of one shape give blocks of the same shapes.
    """
    if tensor.dim() == 0:
        yield tensor
        return
    row = math.prod(tensor.shape[1:])
    if row > limit:
        for sub in tensor:
            yield from blocks(sub, limit)
        return
    step = max(1, limit // max(row, 1))
    for start in range(0, tensor.shape[0], step):
        yield tensor[start:start + step]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bytes (NaNs of the same bits are equal)."""
    a, b = a.contiguous(), b.contiguous()
    if _MEMCMP is not None:
        return a.nbytes == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), a.nbytes) == 0
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _largest(diffs: Iterable[float]) -> float:
    """The largest difference; NaN as soon as one is NaN (nothing later changes the answer)."""
    worst = 0.0
    for diff in diffs:
        if math.isnan(diff):
            return diff
        worst = max(worst, diff)
    return worst


def _piece_diff(a: torch.Tensor, b: torch.Tensor, wide: torch.dtype) -> float:
    """Largest |a - b| of one pair of pieces; 0 where both hold the same value, NaN if one side alone is NaN."""
    a, b = a.to(wide), b.to(wide)  # widening is exact
    if same_bytes(a, b):
        return 0.0
    work = torch.promote_types(wide, torch.float32)
    a, b = a.to(work), b.to(work)
    diff = (a - b).abs_()
    diff.masked_fill_((a == b) | (a.isnan() & b.isnan()), 0)  # equal infinities; NaN on both sides
    return diff.max().item()


def _block_diff(a: torch.Tensor, b: torch.Tensor, wide: torch.dtype) -> float:
    if a.dtype == b.dtype and same_bytes(a, b):
        return 0.0
    return _largest(_piece_diff(x, y, wide) for x, y in zip(blocks(a, PIECE_ELEMENTS), blocks(b, PIECE_ELEMENTS)))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor,
                 after_block: Callable[[torch.Tensor], None] | None = None) -> float:
    """Largest absolute difference of two tensors (inf for different shapes, NaN where one side alone is NaN).

    Memory: a few pieces' float32 temporaries, whatever the tensors' size. ``after_block`` is called
    on each block of both tensors once it is compared (e.g. to hand back its mapped pages).
    """
    if a.shape != b.shape:
        return float("inf")
    wide = torch.promote_types(a.dtype, b.dtype)

    def compared() -> Iterator[float]:
        for block_a, block_b in zip(blocks(a, BLOCK_ELEMENTS), blocks(b, BLOCK_ELEMENTS)):
            yield _block_diff(block_a, block_b, wide)
            if after_block is not None:
                after_block(block_a)
                after_block(block_b)
    return _largest(compared())


def _fresh(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def cat_blockwise(pieces: list[torch.Tensor], dim: int, after_block: Callable[[torch.Tensor], None] | None = None,
                  allocate: Callable[[list[int], torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
    """``torch.cat`` of same-dtype pieces into ``allocate(shape, dtype)`` (fresh memory), copied block by block.

    ``after_block`` is called on each block of the pieces once it is copied.
    """
    shape = list(pieces[0].shape)
    shape[dim] = sum(piece.shape[dim] for piece in pieces)
    joined = (allocate or _fresh)(shape, pieces[0].dtype)
    offset = 0
    for piece in pieces:
        place = joined.narrow(dim, offset, piece.shape[dim])
        for source, target in zip(blocks(piece, BLOCK_ELEMENTS), blocks(place, BLOCK_ELEMENTS)):
            target.copy_(source)
            if after_block is not None:
                after_block(source)
        offset += piece.shape[dim]
    return joined
