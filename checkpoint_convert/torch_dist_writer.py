"""Writing Megatron ``torch_dist`` checkpoints in one CPU process (reading lives in ``torch_dist``).

Chunks are streamed into one ``__0_0.distcp`` file as ``torch.save`` records, what DCP's reader
loads. The checkpoint's ``.metadata`` is a pickled ``torch.distributed.checkpoint`` Metadata, but its
classes are needed only once the data is written: the writer keeps plain tuples until ``finish``
and imports ``torch.distributed.checkpoint`` (about a second) there, so streaming starts that much
sooner. ``finish`` runs after the stream, which waits for the config check importing transformers
beside it, so two threads never import ``torch.distributed`` at once (that can deadlock on Python's
module locks).
"""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import megatron_schema as schema
from .megatron_io import iteration_dir_name, write_tracker
from .sinks import DISK, DiskSink, pickle_to
from .torch_dist_layout import BACKEND_FILE, COMMON_FILE, METADATA_FILE

DATA_FILE = "__0_0.distcp"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}


def _torch_saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# megatron-core stores a sharded object as the ``torch.save`` bytes of the list of its values; the
# extra state of a linear layer without FP8 is None.
EMPTY_EXTRA_STATE = _torch_saved([None])


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whose storage is exactly its bytes: ``torch.save`` of a view writes the whole storage."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _extra_state_objects(shapes: Iterable[tuple[str, tuple[int, ...]]], transformer_engine: bool) -> list[str]:
    """The ``_extra_state`` objects megatron-core's GPTModel asks for, one per linear layer and layer (and expert).

    ``shapes``: (key, global shape) of every tensor written. A layer-stacked key has one object per layer (its
    leading axis), a key of a layer stored apart (``decoder.layers.N.…``) one of shape (1,); expert keys one
    per expert beside."""
    modules: dict[str, tuple[int, ...]] = {}  # module -> the shape of its objects
    for fqn, shape in shapes:
        module, param = fqn.rsplit(".", 1)
        # a linear layer has a weight; a local-spec MoE layer's pre-MLP norm is named linear_fc1.layer_norm_weight
        if fqn.startswith(schema.LAYER_PREFIX) and param == "weight" and module.rsplit(".", 1)[-1].startswith("linear_"):
            layer_axes = 0 if schema.PER_LAYER_KEY.match(fqn) else 1
            modules[module] = tuple(shape[:layer_axes + (".experts.experts." in fqn)]) or (1,)
            if transformer_engine and module.endswith("self_attention.linear_proj"):  # every attention has one
                modules[module.replace("linear_proj", "core_attention")] = tuple(shape[:layer_axes]) or (1,)
    names = []
    for module, shape in modules.items():
        for index in itertools.product(*(range(n) for n in shape)):
            offsets, sizes = ".".join(map(str, index)), ".".join(map(str, shape))
            names.append(f"{module}._extra_state/shard_{offsets}_{sizes}")
    return names


class TorchDistWriter:
    """Streams chunks into one ``.distcp`` file of ``ROOT/release/`` (or the iteration given); ``.metadata``,
    ``common.pt``, ``metadata.json``, the files ``before_tracker(iteration dir)`` writes, then the tracker
    come last, so an unfinished directory never looks complete."""

    def __init__(self, root: Path, common: dict[str, Any], transformer_engine: bool, iteration: str | int = "release",
                 before_tracker: Callable[[Path, DiskSink], None] | None = None, sink: DiskSink = DISK) -> None:
        self.root, self.iteration, self.before_tracker, self.sink = root, iteration, before_tracker, sink
        self.iter_dir = root / iteration_dir_name(iteration)
        self.common, self.transformer_engine = common, transformer_engine
        self._file = sink.open(self.iter_dir / DATA_FILE)
        # fqn -> (dtype, global shape, [(chunk offsets, chunk sizes)]), in write order
        self._tensors: dict[str, tuple[torch.dtype, tuple[int, ...], list[tuple[tuple[int, ...], torch.Size]]]] = {}
        # (fqn, chunk offsets or None for an object, byte offset in DATA_FILE, byte length)
        self._records: list[tuple[str, tuple[int, ...] | None, int, int]] = []

    def write(self, key: Any, tensor: torch.Tensor) -> None:
        """Store one chunk: ``key`` is the engine's DistKey (fqn, offsets, global shape)."""
        chunks = self._tensors.setdefault(key.fqn, (tensor.dtype, tuple(key.global_shape), []))[2]
        chunks.append((tuple(key.offsets), tensor.shape))
        self._store(key.fqn, tuple(key.offsets), _compact(tensor))

    def _store(self, fqn: str, offsets: tuple[int, ...] | None, obj: torch.Tensor | bytes) -> None:
        """Append a tensor (as ``torch.save`` bytes, what DCP's reader loads) or raw object bytes.

        ``torch.save`` without the zip records' CRC-32s, which halve its speed (3.4 -> 1.7 GB/s measured)
        and which ``torch.load``, and so DCP's reader, never checks (torch >= 2.6; older torch computes them)."""
        start = self._file.tell()
        if isinstance(obj, bytes):
            self._file.write(obj)
        else:
            self.sink.torch_save(obj, self._file, compute_crc32=False)
        self._records.append((fqn, offsets, start, self._file.tell() - start))

    def finish(self) -> None:
        objects = _extra_state_objects(((fqn, shape) for fqn, (_, shape, _) in self._tensors.items()),
                                       self.transformer_engine)
        for name in objects:
            self._store(name, None, EMPTY_EXTRA_STATE)
        self._file.close()
        pickle_to(self.sink, self.iter_dir / METADATA_FILE, self._metadata(objects))
        self.sink.torch_save(self.common, self.iter_dir / COMMON_FILE)
        self.sink.write_text(self.iter_dir / BACKEND_FILE, json.dumps(BACKEND))
        if self.before_tracker is not None:
            self.before_tracker(self.iter_dir, self.sink)
        write_tracker(self.root, self.iteration, self.sink)

    @property
    def iteration_dir(self) -> Path:
        return self.iter_dir

    def _metadata(self, objects: list[str]) -> Any:
        """The DCP Metadata of everything written: tensors with their chunks, then the byte objects."""
        from torch.distributed.checkpoint import metadata as dcp
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        entries: dict[str, Any] = {
            fqn: dcp.TensorStorageMetadata(
                properties=dcp.TensorProperties(dtype=dtype), size=torch.Size(shape),
                chunks=[dcp.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=sizes) for offsets, sizes in chunks])
            for fqn, (dtype, shape, chunks) in self._tensors.items()}
        entries.update((name, dcp.BytesStorageMetadata()) for name in objects)
        storage = {dcp.MetadataIndex(fqn, offsets): _StorageInfo(DATA_FILE, start, length)
                   for fqn, offsets, start, length in self._records}
        return dcp.Metadata(state_dict_metadata=entries, storage_data=storage, version="1.0.0")
