"""Writing Megatron ``torch_dist`` checkpoints in one CPU process (reading lives in ``torch_dist``).

Chunks are streamed into one ``__0_0.distcp`` file as ``torch.save`` records, what DCP's reader
loads (one such file per process when several processes share a conversion). The checkpoint's
``.metadata`` is a pickled ``torch.distributed.checkpoint`` Metadata, but its classes are needed only
once the data is written: the writer keeps plain tuples until ``finish`` and imports
``torch.distributed.checkpoint`` (about a second) there, so streaming starts that much sooner.
``finish`` runs after the stream, which waits for the config check importing transformers beside it,
so two threads never import ``torch.distributed`` at once (that can deadlock on Python's module locks).
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


def _extra_state_objects(shapes: Iterable[tuple[str, tuple[int, ...]]], transformer_engine: bool,
                         hybrid: bool = False) -> list[str]:
    """The ``_extra_state`` objects megatron-core's GPTModel asks for, one per linear layer and layer (and expert), and
    under Transformer Engine one per norm module (``schema.te_norm_module``) and layer.

    ``shapes``: (key, global shape) of every tensor written. A layer-stacked key has one object per layer (its
    leading axis), a key of a layer stored apart (``decoder.layers.N.…``) one of shape (1,); expert keys one
    per expert beside. ``hybrid``: megatron-core's MambaModel, whose Mamba mixers' ``in_proj`` / ``out_proj`` are
    linear layers too and which keeps the output layer's object (GPTModel drops it)."""
    modules: dict[str, tuple[int, ...]] = {"output_layer": (1,)} if hybrid else {}  # module -> its objects' shape
    for fqn, shape in shapes:
        fqn = schema.without_part(fqn)
        module, param = fqn.rsplit(".", 1)
        start = max(fqn.find(schema.LAYER_PREFIX), 0)  # after the language model's prefix in a multi-tower model
        local = fqn[start:]
        if transformer_engine and schema.te_norm_module(local):  # a norm of its own: one object per layer, or one
            stacked = local.startswith(schema.LAYER_PREFIX) and not schema.PER_LAYER_KEY.match(local)
            modules[module] = tuple(shape[:1]) if stacked else (1,)
        # a linear layer has a weight; a local-spec MoE layer's pre-MLP norm is named linear_fc1.layer_norm_weight
        mtp = schema.MTP_LAYER.match(local) or local.startswith("mtp.layers.")  # an MTP layer's keys are its own
        last = module.rsplit(".", 1)[-1]
        linear = (last.startswith("linear_") or (mtp and last == "eh_proj")
                  or (hybrid and module.endswith(schema.MAMBA_LINEARS)))
        if param == "weight" and linear and not (local.startswith(schema.LAYER_PREFIX) or mtp):
            modules[module] = (1,)  # a multi-tower model's projector (``vision_projection.encoder.linear_fc1``)
        elif (local.startswith(schema.LAYER_PREFIX) or mtp) and param == "weight" and linear:
            layer_axes = 0 if mtp or schema.PER_LAYER_KEY.match(local) else 1
            modules[module] = tuple(shape[:layer_axes + (".experts.experts." in fqn)]) or (1,)
            if transformer_engine and module.endswith("self_attention.linear_proj"):  # every attention has one
                modules[module.replace("linear_proj", "core_attention")] = tuple(shape[:layer_axes]) or (1,)
    names = []
    for module, shape in modules.items():
        for index in itertools.product(*(range(n) for n in shape)):
            offsets, sizes = ".".join(map(str, index)), ".".join(map(str, shape))
            names.append(f"{module}._extra_state/shard_{offsets}_{sizes}")
    return names


def data_file_name(process: int) -> str:
    """The data file of one saving process, as megatron-core names them (``__{rank}_{thread}.distcp``)."""
    return f"__{process}_0.distcp"


DATA_FILE = data_file_name(0)


class TorchDistWriter:
    """Streams chunks into one ``.distcp`` file of ``ROOT/release/`` (or the iteration given); ``.metadata``,
    ``common.pt``, ``metadata.json``, the files ``before_tracker(iteration dir)`` writes, then the tracker
    come last, so an unfinished directory never looks complete.

    When several processes share a conversion, each streams its chunks into a data file of its own
    (``data_file``); the first (``writes_objects``) also stores the byte objects, and ``finish`` describes
    every process's records (the parts ``close_files`` returned) in the one ``.metadata``.
    """

    def __init__(self, root: Path, common: dict[str, Any], transformer_engine: bool,
                 planned: list[tuple[Any, tuple[int, ...], torch.dtype]], iteration: str | int = "release",
                 before_tracker: Callable[[Path, DiskSink], None] | None = None, sink: DiskSink = DISK,
                 data_file: str = DATA_FILE, writes_objects: bool = True) -> None:
        self.root, self.iteration, self.before_tracker, self.sink = root, iteration, before_tracker, sink
        self.iter_dir = root / iteration_dir_name(iteration)
        self.common, self.transformer_engine = common, transformer_engine
        self.data_file, self.writes_objects = data_file, writes_objects
        self._file: Any = None  # opened by the first chunk (a process given no chunk writes no data file)
        # fqn -> (dtype, global shape, [(chunk offsets, chunk sizes)]), in plan order: every process's chunks
        self._tensors: dict[str, tuple[torch.dtype, tuple[int, ...], list[tuple[tuple[int, ...], torch.Size]]]] = {}
        for key, shape, dtype in planned:
            chunks = self._tensors.setdefault(key.fqn, (dtype, tuple(key.global_shape), []))[2]
            chunks.append((tuple(key.offsets), torch.Size(shape)))
        # (fqn, chunk offsets or None for an object, data file, byte offset in it, byte length)
        self._records: list[tuple[str, tuple[int, ...] | None, str, int, int]] = []

    def write(self, key: Any, tensor: torch.Tensor) -> None:
        """Store one chunk: ``key`` is the engine's DistKey (fqn, offsets, global shape)."""
        self._store(key.fqn, tuple(key.offsets), _compact(tensor))

    def _store(self, fqn: str, offsets: tuple[int, ...] | None, obj: torch.Tensor | bytes) -> None:
        """Append a tensor (as ``torch.save`` bytes, what DCP's reader loads) or raw object bytes.

        ``torch.save`` without the zip records' CRC-32s, which halve its speed (3.4 -> 1.7 GB/s measured)
        and which ``torch.load``, and so DCP's reader, never checks (torch >= 2.6; older torch computes them)."""
        if self._file is None:
            self._file = self.sink.open(self.iter_dir / self.data_file)
        start = self._file.tell()
        if isinstance(obj, bytes):
            self._file.write(obj)
        else:
            self.sink.torch_save(obj, self._file, compute_crc32=False)
        self._records.append((fqn, offsets, self.data_file, start, self._file.tell() - start))

    def _objects(self) -> list[str]:
        return _extra_state_objects(((fqn, shape) for fqn, (_, shape, _) in self._tensors.items()),
                                    self.transformer_engine, bool(getattr(self.common.get("args"), "is_hybrid_model", False)))

    def close_files(self) -> list[tuple[str, tuple[int, ...] | None, str, int, int]]:
        """Store the byte objects (``writes_objects``), close the data file; returns what it holds where."""
        if self.writes_objects:
            for name in self._objects():
                self._store(name, None, EMPTY_EXTRA_STATE)
        if self._file is not None:
            self._file.close()
        return self._records

    def finish(self, parts: list[list[tuple[str, tuple[int, ...] | None, str, int, int]]] | None = None) -> None:
        """``.metadata`` of every process's records (``parts``; this writer's alone without), then the
        files beside it and the tracker, last."""
        records = [record for part in (parts if parts is not None else [self._records]) for record in part]
        pickle_to(self.sink, self.iter_dir / METADATA_FILE, self._metadata(self._objects(), records))
        self.sink.torch_save(self.common, self.iter_dir / COMMON_FILE)
        self.sink.write_text(self.iter_dir / BACKEND_FILE, json.dumps(BACKEND))
        if self.before_tracker is not None:
            self.before_tracker(self.iter_dir, self.sink)
        write_tracker(self.root, self.iteration, self.sink)

    @property
    def iteration_dir(self) -> Path:
        return self.iter_dir

    def _metadata(self, objects: list[str], records: list[tuple[str, tuple[int, ...] | None, str, int, int]]) -> Any:
        """The DCP Metadata of everything written: tensors with their chunks, then the byte objects."""
        from torch.distributed.checkpoint import metadata as dcp
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        # each name as the string of its first record: the pickle refers to it there rather than storing it again
        name: dict[str, str] = {}
        for fqn, *_ in records:
            name.setdefault(fqn, fqn)
        entries: dict[str, Any] = {
            name.get(fqn, fqn): dcp.TensorStorageMetadata(
                properties=dcp.TensorProperties(dtype=dtype), size=torch.Size(shape),
                chunks=[dcp.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=sizes) for offsets, sizes in chunks])
            for fqn, (dtype, shape, chunks) in self._tensors.items()}
        entries.update((name.get(fqn, fqn), dcp.BytesStorageMetadata()) for fqn in objects)
        storage = {dcp.MetadataIndex(fqn, offsets): _StorageInfo(file, start, length)
                   for fqn, offsets, file, start, length in records}
        return dcp.Metadata(state_dict_metadata=entries, storage_data=storage, version="1.0.0")
