"""Where the writers' bytes go: to disk (a conversion), or only counted (a dry run).

Every output writer (Hugging Face shards, Megatron rank files, torch_dist, Megatron-Bridge's files, the
tracker, tokenizer copies, the provenance record) creates its files through a sink. :data:`DISK`
writes them. A :class:`SizingSink` writes nothing: the writers run unchanged on ``meta`` tensors
(shapes and dtypes, no data) and the sink records every file and how many bytes it would hold, so a
dry run's file list and sizes are the real writers' own, not a second model of them.

Sizing needs no tensor data: safetensors and plain files count the bytes written; torch's zip
writer (rank files, ``torch.save``) writes each record's header and skips its data
(``write_record_metadata``, ``torch.serialization.skip_data``, torch >= 2.5), so the zip layout,
pickles and alignment padding are exactly those of the real file. For that, torch's zip files are
always written through a Python file object, never a path: torch names the archive inside a zip
after the file's name when given a path (``model_optim_rng/data.pkl``) and ``archive`` when given a
file object, and the name's length is in every record header. ``torch.load`` reads either.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..base.errors import BadInputError
from .appender import Appender


def _zip_writer(target: Any, compute_crc32: bool) -> Any:
    """torch's zip writer over a path or a file object; ``compute_crc32=False`` is what ``torch.save`` does with
    ``torch.utils.serialization.config.save.compute_crc32 = False`` (torch >= 2.6; older torch always computes it)."""
    try:
        return torch._C.PyTorchFileWriter(target, compute_crc32)
    except TypeError:
        return torch._C.PyTorchFileWriter(target)


def _crc32_setting(compute_crc32: bool) -> Any:
    """``torch.save``'s checksum setting as a context (torch < 2.6 always computes them)."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return _NoSetting()
    return config.patch({"save.compute_crc32": compute_crc32})


class _NoSetting:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class ZipRecords:
    """One torch zip file written record by record (``torch.save``'s container) into an open file."""

    def __init__(self, file: BinaryIO, compute_crc32: bool) -> None:
        self._file = file
        self._writer = _zip_writer(file, compute_crc32)

    def tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Record ``name`` holds the tensor's own bytes (a view into a larger storage writes only its slice)."""
        start = tensor.storage_offset() * tensor.element_size()
        self._writer.write_record(name, tensor.untyped_storage()[start:start + tensor.nbytes], tensor.nbytes)

    def record(self, name: str, data: bytes | str) -> None:
        self._writer.write_record(name, data, len(data))

    def close(self) -> None:
        self._writer.write_end_of_file()
        self._file.close()


class _SizedZipRecords(ZipRecords):
    """A zip file whose data records are sized, not written: torch writes their headers and skips their bytes."""

    def tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write_record_metadata(name, tensor.nbytes)
        self._file.count_tensors(1)


class DiskSink:
    """Files written to disk, parent directories made as needed."""

    sizes_only = False

    def _new(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def appender(self, path: Path) -> Appender:
        return Appender(self._new(path))

    def zip_records(self, path: Path, compute_crc32: bool = True) -> ZipRecords:
        return ZipRecords(self.open(path), compute_crc32)

    def open(self, path: Path) -> BinaryIO:
        """A binary file written front to back (``write``, ``tell``); buffered, so a write of any size is
        completed (one ``write`` call moves at most 2 GiB on Linux)."""
        return open(self._new(path), "wb")

    def torch_save(self, obj: Any, target: Path | BinaryIO, compute_crc32: bool = True) -> None:
        """``torch.save`` into a new file or into an open file at its position."""
        if isinstance(target, Path):
            with self.open(target) as file:
                self.torch_save(obj, file, compute_crc32)
            return
        with _crc32_setting(compute_crc32):
            torch.save(obj, target)

    def write_text(self, path: Path, text: str) -> None:
        self._new(path).write_text(text, encoding="utf-8")

    def copy(self, source: Path, path: Path) -> None:
        self._new(path).write_bytes(source.read_bytes())

    def save_pretrained(self, config: Any, directory: Path, file_name: str) -> None:
        """A transformers configuration object's ``save_pretrained`` (it writes ``file_name`` in ``directory``)."""
        config.save_pretrained(directory)


DISK = DiskSink()


class _Tally(io.RawIOBase):
    """A write-only file that keeps only its length (seeking forward leaves a hole, as skipped data does)."""

    def __init__(self, sink: SizingSink, path: str) -> None:
        super().__init__()
        self._sink, self._path, self._position, self._length = sink, path, 0, 0
        sink.sizes[path] = 0

    def count_tensors(self, count: int) -> None:
        """Note tensors written into this file."""
        self._sink.tensors[self._path] = self._sink.tensors.get(self._path, 0) + count

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        count = memoryview(data).nbytes
        self._advance(count)
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence == os.SEEK_END:
            offset += self._length
        self._position = offset
        self._advance(0)
        return offset

    def tell(self) -> int:
        return self._position

    def _advance(self, count: int) -> None:
        self._position += count
        self._length = max(self._length, self._position)
        self._sink.sizes[self._path] = self._length


class _SizedAppender:
    """:class:`Appender`'s interface, counting."""

    def __init__(self, tally: _Tally) -> None:
        self._tally = tally

    def write(self, data: bytes | memoryview) -> None:
        self._tally.write(data)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self._tally.seek(tensor.nbytes, os.SEEK_CUR)
        self._tally.count_tensors(1)

    def close(self) -> None:
        self._tally.close()


def _with_storage(obj: Any) -> Any:
    """``obj`` with its ``meta`` tensors replaced by CPU tensors of the same shapes and dtypes.

    ``torch.save`` pickles a meta tensor without a storage; a CPU tensor pickles as in the real file.
    ``torch.empty`` only reserves address space: under ``skip_data`` no byte of it is touched.
    """
    if isinstance(obj, torch.Tensor) and obj.is_meta:
        return torch.empty(obj.shape, dtype=obj.dtype)
    if isinstance(obj, dict):
        return {key: _with_storage(value) for key, value in obj.items()}
    return obj


def _tensor_count(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    return sum(map(_tensor_count, obj.values())) if isinstance(obj, dict) else 0


class SizingSink(DiskSink):
    """Writes nothing; ``sizes`` maps every file the writers create (relative to ``root``) to its size in bytes."""

    sizes_only = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sizes: dict[str, int] = {}  # path relative to root -> bytes
        self.tensors: dict[str, int] = {}  # path relative to root -> tensors written into it
        if not hasattr(torch.serialization, "skip_data"):
            raise BadInputError(f"--dry_run needs torch >= 2.5 to size torch files (this is torch {torch.__version__})")

    def _tally(self, path: Path) -> _Tally:
        return _Tally(self, path.relative_to(self.root).as_posix())

    def appender(self, path: Path) -> _SizedAppender:  # type: ignore[override]
        return _SizedAppender(self._tally(path))

    def zip_records(self, path: Path, compute_crc32: bool = True) -> ZipRecords:
        return _SizedZipRecords(self.open(path), compute_crc32)

    def open(self, path: Path) -> BinaryIO:
        return self._tally(path)  # type: ignore[return-value]

    def torch_save(self, obj: Any, target: Path | BinaryIO, compute_crc32: bool = True) -> None:
        file = self.open(target) if isinstance(target, Path) else target
        with torch.serialization.skip_data(), _crc32_setting(compute_crc32):
            torch.save(_with_storage(obj), file)
        file.count_tensors(_tensor_count(obj))

    def write_text(self, path: Path, text: str) -> None:
        self._tally(path).write(text.encode("utf-8"))

    def copy(self, source: Path, path: Path) -> None:
        self._tally(path).seek(source.stat().st_size)

    def save_pretrained(self, config: Any, directory: Path, file_name: str) -> None:
        """What ``save_pretrained`` writes: ``to_json_string(use_diff=True)`` (``to_json_file``'s text)."""
        self.write_text(directory / file_name, config.to_json_string(use_diff=True))


def pickle_to(sink: DiskSink, path: Path, obj: Any) -> None:
    """Pickle ``obj`` into a new file through ``sink``."""
    with sink.open(path) as handle:
        pickle.dump(obj, handle)
