"""The streaming writers produce files the standard readers accept, with the same contents."""
from __future__ import annotations

import argparse
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint_convert.formats.hf_io import SafetensorsStreamWriter
from checkpoint_convert.formats.torch_zip_writer import StreamingTorchFile

TENSORS = {
    "f32": torch.randn(7, 5),
    "bf16": torch.randn(3, 4).to(torch.bfloat16),
    "f16_view": torch.randn(20, 4).half()[5:9],  # a view into a larger storage
    "transposed": torch.randn(6, 3).t(),  # not contiguous
    "int64": torch.arange(12),
    "scalar": torch.tensor(3.5),
}


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("crc", [True, False], ids=["crc32", "no-crc32"])
@pytest.mark.parametrize("options", [dict(weights_only=False), dict(weights_only=True),
                                     dict(weights_only=True, mmap=True)], ids=["plain", "weights_only", "mmap"])
def test_streamed_torch_file_loads_like_torch_save(tmp_path, options, crc):
    obj = {"args": argparse.Namespace(hidden=4, dtype=torch.bfloat16), "version": 3.0, "model": {}}
    reference = dict(obj, model={"nested": dict(TENSORS), "none": None})
    torch.save(reference, tmp_path / "reference.pt")
    streamed = StreamingTorchFile(tmp_path / "streamed.pt", compute_crc32=crc)
    obj["model"] = {"nested": {name: streamed.add(t) for name, t in TENSORS.items()}, "none": None}
    streamed.close(obj)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ours = torch.load(tmp_path / "streamed.pt", **options)
        theirs = torch.load(tmp_path / "reference.pt", **options)
    assert ours["args"] == theirs["args"] and ours["version"] == theirs["version"] and ours["model"]["none"] is None
    for name in TENSORS:
        assert _equal(ours["model"]["nested"][name], theirs["model"]["nested"][name]), name
    # only each tensor's own bytes are stored, not the storage a view points into
    assert streamed.bytes_written == sum(t.nbytes for t in TENSORS.values())
    # with checksums, zip tools verify every record; without, they report the first record (of the archive
    # torch names "archive" when it writes into a file object, as every output file is written: see sinks)
    assert zipfile.ZipFile(tmp_path / "streamed.pt").testzip() == (None if crc else "archive/data/0")


def test_safetensors_reader_maps_privately_and_reads_what_safetensors_reads(tmp_path):
    from safetensors.torch import save_file
    from checkpoint_convert.formats.hf_io import SafetensorsReader

    tensors = {name: t.contiguous() for name, t in TENSORS.items()}
    save_file(tensors, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    reader = SafetensorsReader(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        assert _equal(reader.get_tensor(name), tensor), name
    reader.get_tensor("f32").fill_(7.0)  # a private mapping: the source file never changes
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_streamed_safetensors_file_reads_with_safetensors(tmp_path):
    entries = [(name, tuple(t.shape), t.dtype) for name, t in TENSORS.items()]
    writer = SafetensorsStreamWriter(tmp_path / "model.safetensors", entries)
    for name, tensor in TENSORS.items():
        writer.write(name, tensor)
    writer.close()
    assert writer.complete
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(_equal(loaded[name], tensor.contiguous()) for name, tensor in TENSORS.items())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert handle.get_slice("f32").get_shape() == [7, 5]


@pytest.mark.parametrize("kernel", ["copies", "refuses"])
def test_file_backed_tensors_are_copied_file_to_file(tmp_path, monkeypatch, kernel):
    """Unchanged views of a registered read-only mapping go through copy_file_range (at their own file
    offset); other tensors, or every tensor where the kernel refuses the copy, are written."""
    import errno
    import os

    from safetensors.torch import save_file
    from checkpoint_convert.formats.hf_io import SafetensorsReader
    from checkpoint_convert.base.memory import read_only_file_mappings

    save_file({"a": torch.randn(64, 32), "b": torch.randn(8, 1024)}, tmp_path / "source.safetensors")
    copies = []

    def copy_file_range(src, dst, count, offset_src, offset_dst=None):
        if kernel == "refuses":
            raise OSError(errno.EXDEV, "cross-device")
        copies.append((count, offset_src))
        return real(src, dst, count, offset_src, offset_dst)

    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    with read_only_file_mappings():
        reader = SafetensorsReader(tmp_path / "source.safetensors")
        a, b = reader.get_tensor("a"), reader.get_tensor("b")
        outputs = {"rows": a[16:48], "whole": b, "fresh": a[:4] * 2, "strided": a.t()}
        writer = SafetensorsStreamWriter(tmp_path / "out.safetensors",
                                         [(name, tuple(t.shape), t.dtype) for name, t in outputs.items()])
        for name, tensor in outputs.items():
            writer.write(name, tensor)
        writer.close()
    loaded = load_file(tmp_path / "out.safetensors")
    assert all(_equal(loaded[name], tensor.contiguous()) for name, tensor in outputs.items())
    header = 8 + int.from_bytes((tmp_path / "source.safetensors").read_bytes()[:8], "little")
    expected = [(32 * 32 * 4, header + 16 * 32 * 4), (8 * 1024 * 4, header + 64 * 32 * 4)]
    assert copies == (expected if kernel == "copies" else [])


def test_read_only_registrations_name_live_mappings(tmp_path):
    """A registered range that was unmapped could be reused for new tensors, which release_pages would
    then wipe and the writers would copy from the file instead: every registration must stay mapped."""
    import gc

    from checkpoint_convert.base import memory
    from checkpoint_convert.formats.megatron_formats import open_megatron_tree
    from tests.helpers import reference_megatron_gpt2, tiny_gpt2

    tree_path = reference_megatron_gpt2(tiny_gpt2(None), tmp_path / "m", tp=2, pp=2)
    with memory.read_only_file_mappings():
        tree = open_megatron_tree(tree_path)
        for rank in tree.files:
            tree.names(rank)
        gc.collect()
        with open("/proc/self/maps") as maps:
            live = {(int(a, 16), int(b, 16), fields[5]) for fields in (line.split(maxsplit=5) for line in
                                                                       maps.read().splitlines())
                    if len(fields) == 6 for a, b in [fields[0].split("-")]}
        registered = list(memory._read_only_file_mappings)
    assert len({path for _, _, path, _ in registered}) == 4
    assert all((start, end, path) in live for start, end, path, _ in registered)
    del tree


def test_streamed_safetensors_refuses_unplanned_order(tmp_path):
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expecting a"):
        writer.write("b", torch.zeros(2))
    writer.close()


def test_cat_joins_adjacent_pieces_of_one_storage_without_a_copy():
    """Experts read from one torch_dist chunk are stacked as a view; anything else is copied by torch.cat."""
    from checkpoint_convert.model.parallel import cat, stack

    chunk = torch.randn(4, 6, 5)
    experts = [chunk[e] for e in range(4)]
    stacked = stack(experts)
    assert torch.equal(stacked, chunk) and stacked.data_ptr() == chunk.data_ptr()
    halves = cat([chunk[:2], chunk[2:]])
    assert torch.equal(halves, chunk) and halves.data_ptr() == chunk.data_ptr()
    for pieces in ([chunk[1], chunk[0]], [chunk[0], chunk[2]], [chunk[:, :3], chunk[:, 3:]], [chunk[0], chunk[0]]):
        joined = stack(pieces) if pieces[0].dim() == 2 else cat(pieces, dim=1)
        expected = torch.stack(pieces) if pieces[0].dim() == 2 else torch.cat(pieces, dim=1)
        assert torch.equal(joined, expected) and joined.data_ptr() != chunk.data_ptr()
