"""Whole-tensor passes in bounded blocks (verify's comparison, the merge over TP ranks) give the answers
of the whole-tensor operations they replace, whatever the block boundaries."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_convert.engine import blockwise
from checkpoint_convert.base import memory
from checkpoint_convert.engine.blockwise import blocks, cat_blockwise, max_abs_diff
from checkpoint_convert.formats.hf_io import SafetensorsReader

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements and pieces of 16: tiny tensors span many of both."""
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(blockwise, "PIECE_ELEMENTS", 16)


def reference_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The whole-tensor computation, in the dtype the blockwise one subtracts in."""
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(work) - b.to(work)).abs().max().item()


@pytest.mark.parametrize("shape", [(3, 50, 7), (1000,), (5, 300), (2, 3, 200)])
def test_blocks_cover_every_element_once_in_order(shape):
    tensor = torch.arange(math.prod(shape)).reshape(shape)
    pieces = list(blocks(tensor, 64))
    assert all(piece.numel() <= 64 for piece in pieces)
    assert torch.equal(torch.cat([piece.reshape(-1) for piece in pieces]), tensor.reshape(-1))


def test_a_difference_in_the_last_element_of_the_last_block_is_found(small_blocks):
    a = torch.randn(40, 33).to(torch.bfloat16)
    b = a.clone()
    b[-1, -1] += 0.5
    assert max_abs_diff(a, b) == reference_diff(a, b) > 0.25
    assert max_abs_diff(a, a.clone()) == 0.0


def test_nan_differs_unless_both_sides_hold_it_and_equal_infinities_do_not(small_blocks):
    a = torch.randn(300)
    b = a.clone()
    b[250] = NAN
    assert math.isnan(max_abs_diff(a, b)) and math.isnan(max_abs_diff(b, a))
    assert max_abs_diff(b, b.clone()) == 0.0  # the same model, NaN and all (inspect --check reports the NaN)
    assert max_abs_diff(b.double(), b) == 0.0  # also when the bytes differ (another dtype)
    a[10], b[10], b[250] = INF, INF, a[250]
    assert max_abs_diff(a, b) == 0.0
    b[10] = -INF
    assert max_abs_diff(a, b) == INF
    assert max_abs_diff(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])) == 0.0  # equal values, other bytes


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                    (torch.float32, torch.float64)])
def test_different_dtypes_are_compared_by_value(small_blocks, dtypes):
    a = torch.randn(17, 45).to(dtypes[0])
    assert max_abs_diff(a, a.to(dtypes[1])) == reference_diff(a, a.to(dtypes[1]))
    b = a.to(dtypes[1])
    b[16, 44] += 1
    assert max_abs_diff(a, b) == reference_diff(a, b) >= 0.5


def test_float64_differences_below_float32_resolution_are_found(small_blocks):
    a = torch.ones(200, dtype=torch.float64)
    b = a.clone()
    b[199] += 1e-12
    assert max_abs_diff(a, b) == pytest.approx(1e-12, rel=1e-3)


def test_shapes_scalars_empty_and_strided_tensors(small_blocks):
    a = torch.randn(30, 20)
    assert max_abs_diff(a, a[:29]) == INF
    assert max_abs_diff(torch.tensor(1.0), torch.tensor(3.0)) == 2.0
    assert max_abs_diff(torch.zeros(0, 5), torch.zeros(0, 5)) == 0.0
    b = a.t().contiguous().t()  # same values, other memory layout
    b[29, 19] -= 2
    assert max_abs_diff(a.t(), b.t()) == reference_diff(a, b)


def test_every_block_of_both_sides_is_handed_to_the_callback(small_blocks):
    a, b = torch.randn(10, 50), torch.randn(10, 50)
    seen = []
    max_abs_diff(a, b, after_block=lambda block: seen.append(block.numel()))
    assert sum(seen) == a.numel() + b.numel() and max(seen) <= 64


@pytest.mark.parametrize("dim", [0, 1])
def test_cat_blockwise_is_torch_cat(small_blocks, dim):
    pieces = [torch.randn(9, 13), torch.randn(9, 13), torch.randn(9, 13)]
    copied = []
    joined = cat_blockwise(pieces, dim, after_block=lambda block: copied.append(block.numel()))
    assert torch.equal(joined, torch.cat(pieces, dim))
    assert sum(copied) == 3 * 9 * 13


def test_arena_hands_its_memory_out_again_for_the_next_entry():
    arena = memory.Arena()
    earlier = arena.empty([1000], torch.float32)
    arena.next_entry()
    first = arena.empty([100, 10], torch.bfloat16)
    second = arena.empty([7], torch.float32)
    assert first.data_ptr() == earlier.data_ptr()  # the same memory, touched once
    assert second.data_ptr() >= first.data_ptr() + first.nbytes  # one entry's tensors never overlap
    first.fill_(1)
    second.fill_(2)
    arena.empty([5000], torch.float32)  # grows: tensors handed out before keep their memory
    assert torch.equal(first, torch.ones(100, 10, dtype=torch.bfloat16)) and torch.equal(second, torch.full((7,), 2.0))


def _resident_bytes(address: int) -> int:
    """Rss of this process's mapping that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("address not mapped")


@pytest.mark.skipif(memory._MADVISE is None, reason="madvise is Linux-only")
def test_release_file_pages_hands_back_a_read_block_and_leaves_other_memory_alone(tmp_path):
    expected = torch.randn(1024, 1024)  # 4 MB
    save_file({"w": expected}, str(tmp_path / "w.safetensors"))
    with memory.read_only_file_mappings():
        tensor = SafetensorsReader(tmp_path / "w.safetensors").get_tensor("w")
        assert torch.equal(tensor, expected)
        before = _resident_bytes(tensor.data_ptr())
        memory.release_file_pages(tensor[:512])
        assert before - _resident_bytes(tensor.data_ptr()) >= 2 * 2**20 - 8192  # the block's whole pages
        assert torch.equal(tensor, expected), "released pages come back from the file"
        anonymous = expected.clone()
        memory.release_file_pages(anonymous)
        assert torch.equal(anonymous, expected)
