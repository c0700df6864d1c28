"""Tensor/pipeline/expert parallel math: split and merge by parallel style, vocab padding, stages.

Every function is pure and works on real or ``meta`` tensors, so a conversion can be planned
(shapes, dtypes, output sizes, validation) on ``meta`` tensors before any byte is read or written.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Sequence

import torch

from ..base.errors import BadInputError


def cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat``; on ``meta`` tensors only the result's shape is computed.

    torch's meta kernel for ``cat`` is registered in Python: its first use imports about 800
    modules (1.5 s), which planning a conversion does not need. Pieces that already lie one after
    another in one storage (the experts of a torch_dist chunk) are joined as a view, without a copy.
    """
    tensors = list(tensors)
    first = tensors[0]
    if first.device.type != "meta":
        joined = _adjacent_view(tensors) if dim % max(first.dim(), 1) == 0 else None
        return joined if joined is not None else torch.cat(tensors, dim=dim)
    dim = dim % first.dim()
    for tensor in tensors[1:]:
        if tensor.dim() != first.dim() or any(a != b for i, (a, b) in enumerate(zip(tensor.shape, first.shape)) if i != dim):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {dim}: "
                               f"{tuple(first.shape)} and {tuple(tensor.shape)}")
    shape = list(first.shape)
    shape[dim] = sum(tensor.shape[dim] for tensor in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _adjacent_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The view joining contiguous tensors along dim 0 when each starts where the previous ends."""
    first = tensors[0]
    if first.dim() == 0:
        return None
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for tensor in tensors:
        if (tensor.data_ptr() != end or not tensor.is_contiguous() or tensor.dtype != first.dtype
                or tensor.shape[1:] != first.shape[1:] or tensor.untyped_storage().data_ptr() != storage):
            return None
        end += tensor.nbytes
    shape = (sum(tensor.shape[0] for tensor in tensors), *first.shape[1:])
    return first.as_strided(shape, torch.empty(shape, device="meta").stride())


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` through :func:`cat` (same shape-only path on ``meta`` tensors)."""
    return cat([tensor.unsqueeze(0) for tensor in tensors], dim=0)


class Style(enum.Enum):
    """How a Megatron tensor is laid out across tensor-parallel ranks."""

    REPLICATED = "replicated"  # norms, router, row-parallel biases: same on every rank
    COLUMN = "column"  # split along dim 0 (qkv, fc1, column biases)
    ROW = "row"  # split along dim 1 (proj, fc2 weights)
    VOCAB = "vocab"  # column split of a vocab-padded tensor (embedding, output layer)
    GLU_COLUMN = "glu_column"  # [gate; up] halves, each split along dim 0, fused per rank
    # column-parallel in megatron-core's local spec, a full copy on every rank under Transformer Engine
    # (multi-latent attention's down projections: ColumnParallelLinear there, a duplicated TELinear here)
    COLUMN_UNLESS_TE = "column_unless_te"
    # parts fused along dim 0 (their row counts from the table), each split along dim 0 on its own and fused
    # again per rank: GLU_COLUMN for parts of any sizes (a Mamba mixer's in_proj [z, x, B, C, dt], conv1d [x, B, C])
    PARTS_COLUMN = "parts_column"


def style_in_schema(style: Style, transformer_engine: bool) -> Style:
    """The style a tensor has in rank files of one key schema (only ``COLUMN_UNLESS_TE`` depends on it)."""
    if style is not Style.COLUMN_UNLESS_TE:
        return style
    return Style.REPLICATED if transformer_engine else Style.COLUMN


def split_for_tp(full: torch.Tensor, style: Style, tp: int, parts: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Split a full (un-parallel) Megatron tensor into ``tp`` rank shards (``parts``: ``PARTS_COLUMN``'s row counts)."""
    if style is Style.REPLICATED or tp == 1:
        return [full] * tp
    if style is Style.ROW:
        return list(torch.chunk(full, tp, dim=1)) if full.dim() > 1 else [full] * tp
    if style in (Style.GLU_COLUMN, Style.PARTS_COLUMN):
        pieces = _column_parts(full, style, parts, 1)
        return [cat([_rank_chunk(piece, tp, rank) for piece in pieces], dim=0) for rank in range(tp)]
    return list(torch.chunk(full, tp, dim=0))


def _column_parts(tensor: torch.Tensor, style: Style, parts: Sequence[int] | None, tp: int) -> list[torch.Tensor]:
    """The fused parts of a full tensor (``tp`` 1) or of one rank's shard: [gate; up] halves, or ``parts``' rows."""
    if style is Style.GLU_COLUMN:
        return list(torch.chunk(tensor, 2, dim=0))
    sizes = [size // tp for size in parts or ()]
    if sum(sizes) != tensor.shape[0] or any(size % tp for size in parts or ()):
        raise BadInputError(f"{tensor.shape[0]} rows are not parts of {list(parts or ())} rows split {tp} ways")
    return list(torch.split(tensor, sizes, dim=0))


def _rank_chunk(piece: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    rows = piece.shape[0] // tp
    return piece[rank * rows:(rank + 1) * rows]


def merge_from_tp(shards: Sequence[torch.Tensor], style: Style,
                  join: Callable[[list[torch.Tensor], int], torch.Tensor] = cat,
                  parts: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`split_for_tp`; ``join`` concatenates the pieces (``cat``'s signature)."""
    pieces, dim = _tp_pieces(shards, style, parts)
    return pieces[0] if len(pieces) == 1 else join(pieces, dim)


def _tp_pieces(shards: Sequence[torch.Tensor], style: Style,
               parts: Sequence[int] | None = None) -> tuple[list[torch.Tensor], int]:
    """What :func:`merge_from_tp` joins, in order, and along which dimension (one piece: nothing to join)."""
    if style is Style.REPLICATED or len(shards) == 1 or (style is Style.ROW and shards[0].dim() < 2):
        return [shards[0]], 0
    if style is Style.ROW:
        return list(shards), 1
    if style in (Style.GLU_COLUMN, Style.PARTS_COLUMN):
        per_rank = [_column_parts(shard, style, parts, len(shards)) for shard in shards]
        return [rank[part] for part in range(len(per_rank[0])) for rank in per_rank], 0
    return list(shards), 0


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocab: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def pad_vocab(full: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Pad rows to ``padded_size`` by repeating the last row, as Megatron's converters do."""
    extra = padded_size - full.shape[0]
    if extra < 0:
        raise BadInputError(f"vocab of {full.shape[0]} rows does not fit the padded size {padded_size}")
    if extra == 0:
        return full
    return cat([full, full[-1:].expand(extra, *full.shape[1:])], dim=0)


def trim_vocab(full: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop Megatron's padding rows."""
    if full.shape[0] < vocab_size:
        raise BadInputError(f"embedding has {full.shape[0]} rows, fewer than the vocab size {vocab_size}")
    return full[:vocab_size]


def layers_per_stage(num_layers: int, pp: int, uneven: Sequence[int] | None = None) -> list[int]:
    """Layer counts of each pipeline stage: the explicit uneven list, or an even split."""
    if uneven:
        stages = [int(n) for n in uneven]
        if len(stages) != pp:
            raise BadInputError(f"--target_pipeline_layers lists {len(stages)} stages but the pipeline has {pp} "
                                "(with a virtual pipeline: PP x VPP, in model order)")
        if sum(stages) != num_layers or min(stages) < 0:
            raise BadInputError(
                f"--target_pipeline_layers {','.join(map(str, stages))} must sum to num_layers={num_layers}")
        return stages
    if num_layers % pp:
        raise BadInputError(
            f"pipeline size {pp} does not divide num_layers={num_layers}; use --target_pipeline_layers")
    return [num_layers // pp] * pp


def stage_offsets(stages: Sequence[int]) -> list[int]:
    """First global layer index of each stage."""
    offsets, total = [], 0
    for count in stages:
        offsets.append(total)
        total += count
    return offsets


def expert_placement(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """(expert-parallel rank, index local to that rank) of a global expert."""
    if num_experts % ep:
        raise BadInputError(f"expert parallel size {ep} does not divide the {num_experts} experts")
    return divmod(expert, num_experts // ep)


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating tensors to ``dtype`` (None keeps the dtype)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)
