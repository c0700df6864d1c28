"""MXFP4 sources (gpt-oss as OpenAI released it): dequantized on read, tensor by tensor.

A checkpoint whose config.json says ``quantization_config.quant_method: mxfp4`` stores some tensors ``X`` as
``X_blocks`` (uint8 [..., rows, groups, 16]: two 4-bit E2M1 values per byte, the low nibble first) and
``X_scales`` (uint8 [..., rows, groups]: one E8M0 power of two per group of 32 values, biased by 127). Row
``r`` holds ``groups * 32`` values: value ``j`` is ``E2M1[nibble j] * 2 ** (scale[r, j // 32] - 127)``. The
rows are the output features, so the dequantized [..., rows, groups * 32] is the transpose of the tensor the
model multiplies from the left (transformers' ``integrations/mxfp4.py`` ``convert_moe_packed_tensors``, whose
result the tests compare with this one bit for bit): ``X`` reads as that transpose, a view.

The pair is exposed under ``X`` as an alias of the stored tensors (:meth:`HFCheckpoint.add_aliases`), so the
conversion asks for ``X`` as for any tensor and both stored tensors count as read. Memory: the dequantized
tensor, plus about 16 MB of float32 work at a time.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..base.errors import BadInputError

BLOCKS, SCALES = "_blocks", "_scales"
VALUES_PER_BYTE, GROUP = 2, 32
# E2M1: sign bit, two exponent bits, one mantissa bit (the OCP Microscaling spec's FP4 values)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float32)
SCALE_BIAS = 127
_BYTES = torch.arange(256)
# every byte's two values (low nibble first) and every scale's power of two, in float32 (2^-127 exact, 2^128 inf)
_PAIRS = torch.stack([E2M1[_BYTES & 0x0F], E2M1[_BYTES >> 4]], dim=-1)
_POWERS = torch.ldexp(torch.ones(256, dtype=torch.float32), _BYTES - SCALE_BIAS)
_PAIR_AS = {torch.bfloat16: torch.int32, torch.float32: torch.int64}  # one lookup fetches both values of a byte
_CHUNK = 1 << 22  # elements of work per step


def is_mxfp4(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"


def check_pair(name: str, blocks: torch.Tensor, scales: torch.Tensor, source: Any) -> None:
    """A ``_blocks`` / ``_scales`` pair (``meta`` tensors will do) that holds MXFP4 values, else bad input."""
    if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() < 3
            or blocks.shape[-1] != GROUP // VALUES_PER_BYTE or tuple(scales.shape) != tuple(blocks.shape[:-1])):
        raise BadInputError(f"'{name}{BLOCKS}' ({blocks.dtype}, {list(blocks.shape)}) and '{name}{SCALES}' "
                            f"({scales.dtype}, {list(scales.shape)}) are not MXFP4 blocks of {GROUP} values "
                            f"(uint8 [..., rows, groups, 16] and uint8 [..., rows, groups])", source)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [..., groups * 32, rows] tensor the pair holds, as ``dtype``: a transposed view of [..., rows, values].

    Exact: an E2M1 value times a power of two, computed in bf16 or float32 (other dtypes: float32, then cast) a
    few rows at a time; each byte's pair of values is one table lookup.
    """
    *prefix, rows, groups, width = blocks.shape
    flat_blocks, flat_scales = blocks.reshape(-1, groups, width), scales.reshape(-1, groups)
    out = torch.empty(flat_blocks.shape[0], groups, width * VALUES_PER_BYTE, dtype=dtype)
    work = dtype if dtype in _PAIR_AS else torch.float32
    pairs, powers = _PAIRS.to(work).view(_PAIR_AS[work]).reshape(-1), _POWERS.to(work)
    step = max(1, _CHUNK // (groups * GROUP))
    for start in range(0, flat_blocks.shape[0], step):
        packed, exponents = flat_blocks[start:start + step], flat_scales[start:start + step]
        values = torch.index_select(pairs, 0, packed.reshape(-1).int()).view(work).view(*packed.shape[:-1], -1)
        factors = torch.index_select(powers, 0, exponents.reshape(-1).int()).view(*exponents.shape, 1)
        if work == dtype:
            torch.mul(values, factors, out=out[start:start + step])
        else:
            out[start:start + step] = values.mul_(factors)
    return out.reshape(*prefix, rows, groups * GROUP).transpose(-1, -2)


def _dequantized_meta(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *prefix, rows, groups, _ = blocks.shape
    return torch.empty(*prefix, groups * GROUP, rows, dtype=dtype, device="meta")


def aliases(names: list[str], meta: Callable[[str], torch.Tensor], dtype: Callable[[], torch.dtype],
            source: Any) -> dict[str, tuple[list[str], Callable]]:
    """``X`` -> ([``X_blocks``, ``X_scales``], dequantize) for every pair among the stored ``names``; a ``_blocks``
    tensor without its ``_scales`` (or the reverse) is bad input. ``meta``: a stored tensor's shape and dtype;
    ``dtype``: what to dequantize to, asked at each read (a conversion sets it after opening the source)."""
    stored = set(names)
    pairs: dict[str, tuple[list[str], Callable]] = {}
    for name in names:
        for suffix, other in ((BLOCKS, SCALES), (SCALES, BLOCKS)):
            if name.endswith(suffix) and name[:-len(suffix)] + other not in stored:
                raise BadInputError(f"'{name}' has no '{name[:-len(suffix)] + other}' beside it, in a checkpoint whose "
                                    "quantization_config says its tensors are MXFP4", source)
        if name.endswith(BLOCKS):
            base = name[:-len(BLOCKS)]
            check_pair(base, meta(name), meta(base + SCALES), source)

            def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
                if tensors[0].device.type == "meta":
                    return _dequantized_meta(tensors[0], dtype())
                return dequantize(tensors[0], tensors[1], dtype())
            pairs[base] = ([name, base + SCALES], combine)
    return pairs
