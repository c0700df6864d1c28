"""Write a ``torch.save``-compatible file incrementally: tensors first, the pickle last.

``torch.save`` needs the whole object in memory. Megatron rank files of a big model at TP1 PP1 hold
the entire model, so this writer streams instead: each tensor's bytes go straight into the zip as a
``data/N`` record (64-byte aligned by torch's own ``PyTorchFileWriter``, so ``torch.load(mmap=True)``
works), and a small placeholder is kept. At the end the object is pickled with the same persistent
ids and tensor rebuild calls ``torch.save`` emits. The result loads with plain ``torch.load``,
``weights_only=True`` and ``mmap=True``.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from .sinks import DISK, DiskSink

PICKLE_PROTOCOL = 2  # torch.save's default


class _StoredStorage:
    """A storage already written as record ``data/<key>``."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class StoredTensor:
    """Stands in for a written tensor until the pickle is written; pickles as the tensor itself."""

    def __init__(self, storage: _StoredStorage, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _StoredStorage):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class StreamingTorchFile:
    """One output file: ``add`` tensors as they are produced, then ``close`` with the object.

    ``compute_crc32``: torch's zip writer checksums every record at about 0.4 GB/s, the slowest step
    of writing a rank file, and ``torch.load`` never checks the checksums; without them the file is
    the same to torch, but zip tools (``unzip -t``) report CRC errors.
    """

    def __init__(self, path: Path, compute_crc32: bool = True, sink: DiskSink = DISK) -> None:
        self.path = path
        self._zip = sink.zip_records(path, compute_crc32)
        self._records = 0
        self.bytes_written = 0

    def add(self, tensor: torch.Tensor) -> StoredTensor:
        """Write the tensor's bytes now; return the placeholder to put in the object."""
        tensor = tensor.detach()
        if tensor.device.type not in ("cpu", "meta"):  # meta: a dry run's planned tensor, which its sink sizes
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        key = str(self._records)
        self._records += 1
        self._zip.tensor(f"data/{key}", tensor)
        self.bytes_written += tensor.nbytes
        return StoredTensor(_StoredStorage(key, tensor.dtype, tensor.numel()), tuple(tensor.shape), tensor.stride())

    def close(self, obj: Any) -> None:
        """Pickle ``obj`` (holding placeholders) as ``data.pkl`` and finish the zip."""
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
        data = buffer.getvalue()
        self._zip.record("data.pkl", data)
        for name, value in ((".format_version", "1"), (".storage_alignment", "64"), ("byteorder", sys.byteorder)):
            self._zip.record(name, value)
        self._zip.close()
