"""Reading Megatron's ``torch_dist`` checkpoints (``--ckpt-format torch_dist``) in one CPU process.

An iteration directory holds ``metadata.json`` (the backend), ``common.pt`` (args, versions: no
weights), ``.metadata`` (a pickled ``torch.distributed.checkpoint`` Metadata) and ``__R_k.distcp``
data files. Tensors are global (un-split); the layers of the decoder share one key with the layer as
the leading axis (``decoder.layers.self_attention.linear_qkv.weight`` [L, rows, hidden]), MoE experts
add an expert axis ([L, E, ...]), and SwiGLU fc1 is stored as [all gate rows; all up rows]: exactly the
full tensors the engine works with. Norms always use Transformer Engine names, and ``_extra_state``
entries are pickled byte objects. Megatron-Bridge saves the same data, described by ``run_config.yaml``
instead of ``common.pt``'s args (:func:`open_bridge`; megatron-core 0.19 keeps its common state inside the
data file, as ``common_state``).

This module imports ``torch.distributed.checkpoint`` (about a second and 50 MB), so it is imported only
when a torch_dist checkpoint is read (``torch_dist_writer`` writes them). Reading presents the checkpoint as a one-rank tree of
global tensors, so the engine's merge code applies unchanged. A layer slice held by one stored chunk is a
view of the memory-mapped data file (the chunk's pickle is loaded with ``weights_only=True`` onto
``meta`` for its layout); a slice spanning chunks is assembled by ``torch.distributed.checkpoint``'s own
``FileSystemReader``. ``FileSystemReader.read_metadata`` unpickles ``.metadata`` without restriction, so it is read here
with an unpickler that accepts only the checkpoint metadata classes.
"""
from __future__ import annotations

import io
import json
import mmap
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..base.errors import BadInputError, reason
from ..base.memory import map_for_reading
from ..model.parallel import cat
from . import megatron_schema as schema
from .bridge_config import read_bridge_args
from .megatron_args import whole_number
from .megatron_io import RankKey, checkpoint_version, iteration_number, parallel_sizes
from .safe_load import safe_torch_load
from .torch_dist_layout import BACKEND_FILE, COMMON_FILE, METADATA_FILE, RUN_CONFIG_FILE, TOKENIZER_DIR

# What a training run stores beside the model weights; every other tensor must be read by a conversion
# rule (an unknown one, e.g. multi-token-prediction layers, is an error rather than silently dropped).
TRAINING_STATE_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine")


_STACKED_EXPERT = re.compile(r"^mlp\.experts\.(?:experts\.)?(linear_fc[12])\.(weight|bias)$")

# The classes a ``.metadata`` pickle written by torch.distributed.checkpoint refers to.
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *{("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")},
    *{("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")},
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only checkpoint metadata: dataclasses of torch.distributed.checkpoint and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not checkpoint metadata")


def read_metadata(iter_dir: Path) -> dcp_metadata.Metadata:
    file = iter_dir / METADATA_FILE
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise BadInputError("torch_dist checkpoint has no .metadata file", iter_dir)
    except Exception as error:  # pickle raises many types for damaged or hostile files
        raise BadInputError(f"unreadable torch_dist metadata ({reason(error, 160)})", file)
    try:
        problem = _metadata_problem(metadata)
    except Exception as error:  # objects a damaged pickle built without the fields they must have
        problem = f"{reason(error, 160)}"
    if problem:
        raise BadInputError(f"inconsistent torch_dist metadata: {problem}", file)
    return metadata


def _metadata_problem(metadata: Any) -> str | None:
    """What is wrong with the checkpoint's description of its tensors and of where their bytes are."""
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict) \
            or not isinstance(metadata.state_dict_metadata, dict):
        return "not a torch.distributed.checkpoint Metadata"
    problem = next(filter(None, (_tensor_entry_problem(fqn, entry, metadata.storage_data)
                                 for fqn, entry in metadata.state_dict_metadata.items())), None)
    return problem or next(filter(None, map(_storage_problem, metadata.storage_data.items())), None)


def _sizes(value: Any, length: int | None = None) -> bool:
    """A sequence of whole numbers of at least 0 (of ``length`` numbers when given)."""
    return (isinstance(value, (tuple, list)) and (length is None or len(value) == length)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))


def _tensor_entry_problem(fqn: Any, entry: Any, storage: dict) -> str | None:
    """What is wrong with one tensor's description: its global size, dtype, chunks, or their storage."""
    if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
        return None if isinstance(entry, dcp_metadata.BytesStorageMetadata) else f"'{fqn}' is described by a {type(entry).__name__}"
    if not _sizes(entry.size) or not isinstance(getattr(entry.properties, "dtype", None), torch.dtype):
        return f"'{fqn}' has size {entry.size!r} and dtype {getattr(entry.properties, 'dtype', None)!r}"
    for chunk in entry.chunks if isinstance(entry.chunks, list) else [None]:
        ok = chunk is not None and _sizes(chunk.offsets, len(entry.size)) and _sizes(chunk.sizes, len(entry.size))
        if not ok or any(o + n > total for o, n, total in zip(chunk.offsets, chunk.sizes, entry.size)):
            return f"'{fqn}' {list(entry.size)} has a chunk {chunk!r} outside it"
        if dcp_metadata.MetadataIndex(fqn, chunk.offsets) not in storage:
            return f"'{fqn}' has a chunk at {list(chunk.offsets)} with no stored bytes"
    return None


def _storage_problem(item: tuple[Any, Any]) -> str | None:
    """Where one chunk's bytes are: a file name in the checkpoint directory, and a byte range in it."""
    index, info = item
    path = getattr(info, "relative_path", None)
    if not isinstance(path, str) or "/" in path or path in ("", ".", ".."):
        return f"'{getattr(index, 'fqn', index)}' is stored in {path!r}, not a file of the checkpoint directory"
    if not _sizes([getattr(info, "offset", None), getattr(info, "length", None)]):
        return f"'{index.fqn}' has bytes at offset {info.offset!r}, length {info.length!r}"
    return None


def _read_backend(iter_dir: Path) -> None:
    file = iter_dir / BACKEND_FILE
    try:
        backend = json.loads(file.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as error:
        raise BadInputError(f"unreadable backend description ({error})", file)
    if backend != "torch_dist":
        raise BadInputError(f"sharded backend '{backend}' is not supported (only torch_dist)", file)


class _RegionPlanner(LoadPlanner):
    """Copies what ``FileSystemReader.read_data`` reads into one destination tensor (a region of a key)."""

    def __init__(self, destination: torch.Tensor) -> None:
        self.destination = destination

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan([])

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        pass

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return narrow_tensor_by_index(self.destination, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


@dataclass(frozen=True)
class _Stored:
    """Where a canonical tensor lives: a key and the index of its slice on the leading axes."""

    fqn: str
    index: tuple[int, ...]
    parts: tuple["_Stored", ...] = ()  # a tensor stored as named parts (``megatron_schema.NAMED_PARTS``), in order


def open_torch_dist(iter_dir: Path, trust: bool = False) -> "TorchDistTree":
    """A Megatron-LM torch_dist checkpoint: its args, version and iteration are in ``common.pt``."""
    common = safe_torch_load(iter_dir / COMMON_FILE, trust=trust, lazy=False)
    if not isinstance(common, dict) or common.get("args") is None:
        raise BadInputError("common.pt has no 'args'; the checkpoint cannot be converted without them",
                            iter_dir / COMMON_FILE)
    return TorchDistTree(iter_dir, common["args"], iter_dir / COMMON_FILE, common.get("iteration", 0),
                         checkpoint_version(common, iter_dir / COMMON_FILE, default=3.0))


def open_bridge(iter_dir: Path, trust: bool = False) -> "TorchDistTree":
    """A Megatron-Bridge checkpoint: the same torch_dist data, its architecture read from ``run_config.yaml``
    as data (``common.pt``, when there is one, holds nothing Megatron-Bridge reads), the tokenizer beside it."""
    tokenizer = iter_dir / TOKENIZER_DIR
    run_config = iter_dir / RUN_CONFIG_FILE
    return TorchDistTree(iter_dir, read_bridge_args(run_config), run_config, iteration_number(iter_dir.name),
                         producer="megatron-bridge", tokenizer_dir=tokenizer if tokenizer.is_dir() else None)


class TorchDistTree:
    """A torch_dist iteration directory, seen as a one-rank tree of global tensors.

    It offers what the engine asks of :class:`~checkpoint_convert.megatron_io.MegatronTree`
    (``tensor``, ``all_weight_names``, ``stage_layer_counts``, ``tp``/``pp``/``ep`` of the stored
    shards, all 1); ``args_layout`` is the layout the run was trained with.
    """

    ckpt_format = "torch_dist"

    def __init__(self, iter_dir: Path, args: Any, args_file: Path, iteration: Any = 0, version: float = 3.0,
                 producer: str = "megatron", tokenizer_dir: Path | None = None) -> None:
        self.iter_dir, self.args_file = iter_dir, args_file  # args_file: where the args were read, for messages
        _read_backend(iter_dir)
        self.args, self.iteration, self.version = args, iteration, version
        self.producer, self.tokenizer_dir = producer, tokenizer_dir
        self.metadata = read_metadata(iter_dir)
        self.tp = self.pp = self.ep = 1
        self.args_layout = parallel_sizes(self.args, self.args_file)
        # the training run's virtual pipeline (tensors are global whatever it was): a default for the output
        self.vpp = whole_number(getattr(self.args, "virtual_pipeline_model_parallel_size", None) or 1,
                                "virtual_pipeline_model_parallel_size", self.args_file)
        impl = getattr(self.args, "transformer_impl", "transformer_engine")
        self.schema = schema.MCORE_LOCAL if impl == "local" else schema.MCORE_TE
        self.files = {RankKey(0, 0, 0): iter_dir / METADATA_FILE}
        model_keys = {fqn for fqn, _ in self._tensor_keys()}
        self.skipped = sorted(k for k in self.metadata.state_dict_metadata if k not in model_keys)
        self.prefix = ""  # the language model's prefix in a multi-tower model (see ``within``)
        self._names = self._index()
        self._reader = FileSystemReader(str(iter_dir))
        self._last_chunk: tuple[tuple[str, tuple[int, ...]], torch.Tensor] | None = None
        self._maps: dict[Path, mmap.mmap] = {}  # data files, mapped once each
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def _tensor_keys(self) -> Iterable[tuple[str, dcp_metadata.TensorStorageMetadata]]:
        """The model's tensors: not byte objects (extra state, RNG), not optimizer or other training state."""
        for fqn, entry in self.metadata.state_dict_metadata.items():
            if isinstance(entry, dcp_metadata.TensorStorageMetadata) and not fqn.startswith(TRAINING_STATE_PREFIXES):
                yield fqn, entry

    def within(self, prefix: str) -> None:
        """Read the language model under ``prefix`` (``FamilySpec.megatron_prefix``): its keys lose the prefix, the
        other towers' keys stay whole (``model.family.Tower``)."""
        self.prefix = prefix
        self._names = self._index()

    def _model_keys(self) -> Iterable[tuple[str | None, str, dcp_metadata.TensorStorageMetadata]]:
        """(the language model's name without its prefix, or None for another tower's key; stored key; entry)."""
        for fqn, entry in self._tensor_keys():
            yield fqn[len(self.prefix):] if fqn.startswith(self.prefix) else None, fqn, entry

    def _index(self) -> dict[tuple[int | None, str], _Stored]:
        """Canonical (layer, name) -> stored key and slice, for every model tensor: a layer-stacked key
        (``decoder.layers.<rel>``, the layer its leading axis) or a key of one layer stored apart
        (``decoder.layers.N.<rel>``, see ``megatron_schema.layers_stored_apart``)."""
        table: dict[tuple[int | None, str], _Stored] = {}
        parts: dict[tuple[int | None, str], dict[str, _Stored]] = {}
        for name, fqn, entry in self._model_keys():
            if name is None:  # another tower's key: itself, or one entry a layer of its stacked layers
                table.update(_tower_entries(fqn, entry, self.schema))
                continue
            if not name.startswith(schema.LAYER_PREFIX):
                table.update(_global_entries(name, fqn, entry, self.schema))
                continue
            apart = schema.PER_LAYER_KEY.match(name)
            if apart:
                places = [(int(apart.group(1)), ())]
                rel = apart.group(2)
            else:
                places = [(layer, (layer,)) for layer in range(entry.size[0])]
                rel = name[len(schema.LAYER_PREFIX):]
            expert = _STACKED_EXPERT.match(rel)
            for layer, index in places:
                if expert:
                    for e in range(entry.size[len(index)]):
                        name = f"mlp.experts.local_experts.{e}.{expert.group(1)}.{expert.group(2)}"
                        table[(layer, name)] = _Stored(fqn, (*index, e))
                    continue
                name = schema.canonical_name(f"{schema.LAYER_PREFIX}0.{rel}", self.schema)[1]
                part = schema.named_part(name)
                if part:
                    parts.setdefault((layer, part[0]), {})[part[1]] = _Stored(fqn, index)
                else:
                    table[(layer, name)] = _Stored(fqn, index)
        return {**table, **self._joined_parts(parts)}

    def _joined_parts(self, parts: dict[tuple[int | None, str], dict[str, _Stored]]) -> dict:
        """One entry per tensor stored as named parts, its parts in ``NAMED_PARTS`` order; all must be there."""
        joined = {}
        for (layer, name), found in parts.items():
            order = schema.NAMED_PARTS[name]
            if set(found) != set(order):
                missing = ", ".join(f"{name}.{part}" for part in order if part not in found)
                raise BadInputError(f"layer {layer} '{name}' lacks its parts {missing}", self.iter_dir / METADATA_FILE)
            joined[(layer, name)] = _Stored(name, (), tuple(found[part] for part in order))
        return joined

    def stage_layer_counts(self) -> list[int]:
        """The model's layers: the leading axis of layer-stacked keys, else the layers stored apart."""
        counts = {entry.size[0] for name, _, entry in self._model_keys()
                  if name and name.startswith(schema.LAYER_PREFIX) and not schema.PER_LAYER_KEY.match(name)}
        apart = {int(match.group(1)) for name, _, _ in self._model_keys()
                 if name and (match := schema.PER_LAYER_KEY.match(name))}
        counts = counts or ({max(apart) + 1} if apart else set())
        if len(counts) > 1 or (apart and max(apart) >= min(counts)):
            raise BadInputError(f"layer-stacked tensors disagree on the number of layers: {sorted(counts | apart)}",
                                self.iter_dir / METADATA_FILE)
        return [counts.pop() if counts else 0]

    def all_weight_names(self, rank: Any) -> Iterable[tuple[int | None, str]]:
        return self._names.keys()

    def extra_states(self) -> list[tuple[str, str, int, str]]:
        """Every ``_extra_state`` byte entry: (key, form, bytes, data file); none is ever unpickled."""
        found = []
        for fqn, entry in self.metadata.state_dict_metadata.items():
            if isinstance(entry, dcp_metadata.BytesStorageMetadata) and "_extra_state" in fqn:
                info = self.metadata.storage_data.get(dcp_metadata.MetadataIndex(fqn))
                found.append((fqn, "bytes", int(getattr(info, "length", 0)), getattr(info, "relative_path", "?")))
        return found

    def _stored(self, canonical: str, layer: int | None) -> _Stored:
        stored = self._names.get((layer, canonical))
        if stored is None:
            where = f"layer {layer} " if layer is not None else ""
            raise BadInputError(f"{where}tensor '{canonical}' is missing", self.iter_dir / METADATA_FILE)
        return stored

    def holders(self, rank: Any, canonical: str, layer: int | None) -> list[str]:
        """The data files holding chunks of a tensor's slice."""
        return sorted({file for stored in self._pieces(self._stored(canonical, layer)) for file in self._files(stored)})

    @staticmethod
    def _pieces(stored: _Stored) -> tuple[_Stored, ...]:
        return stored.parts or (stored,)

    def _files(self, stored: _Stored) -> set[str]:
        entry = self.metadata.state_dict_metadata[stored.fqn]
        def overlaps(chunk: ChunkStorageMetadata) -> bool:
            return all(start <= i < start + size for i, start, size in zip(stored.index, chunk.offsets, chunk.sizes))
        return {self.metadata.storage_data[dcp_metadata.MetadataIndex(stored.fqn, chunk.offsets)].relative_path
                for chunk in entry.chunks if overlaps(chunk)}

    def tensor(self, rank: Any, canonical: str, layer: int | None, meta: bool = False) -> torch.Tensor:
        stored = self._stored(canonical, layer)
        if stored.parts:  # read part by part, joined along the rows
            return cat([self._tensor_of(part, meta) for part in stored.parts], dim=0)
        return self._tensor_of(stored, meta)

    def _tensor_of(self, stored: _Stored, meta: bool) -> torch.Tensor:
        entry = self.metadata.state_dict_metadata[stored.fqn]
        fixed = len(stored.index)
        shape = tuple(entry.size[fixed:])
        if meta:
            return torch.empty(shape, dtype=entry.properties.dtype, device="meta")
        return self._read_region(stored, entry, shape)

    def _read_region(self, stored: _Stored, entry: dcp_metadata.TensorStorageMetadata,
                     shape: tuple[int, ...]) -> torch.Tensor:
        """Read one slice (a layer, or a layer's expert) of a stored key: only the chunks it overlaps.

        A slice inside one stored chunk (a layer; one expert of a chunk holding a layer's experts) is
        cut from that chunk, which is opened once (its pickle loaded, its bytes mapped) and kept until
        a slice of another chunk is read, so reading every expert costs one load, not one each.
        """
        chunk = _enclosing_chunk(entry, stored.index)
        if chunk is None:  # the slice spans chunks (saved tensor-parallel): DCP's reader assembles it
            fixed = len(stored.index)
            return self._read(stored.fqn, entry, [*stored.index, *(0 for _ in shape)],
                              [1] * fixed + list(shape)).reshape(shape)
        key = (stored.fqn, tuple(chunk.offsets))
        if self._last_chunk is None or self._last_chunk[0] != key:
            self._last_chunk = None  # let the previous chunk go before loading the next
            self._last_chunk = (key, self._load_chunk(stored.fqn, entry, chunk))
        within = tuple(i - start for i, start in zip(stored.index, chunk.offsets))
        return self._last_chunk[1][within]

    def _load_chunk(self, fqn: str, entry: dcp_metadata.TensorStorageMetadata,
                    chunk: ChunkStorageMetadata) -> torch.Tensor:
        """A whole stored chunk, as a view of the memory-mapped data file: no copy, read when touched.

        A chunk is the ``torch.save`` bytes of its tensor. Loading them onto ``meta`` reads only the
        pickle and yields the tensor's layout and where its storage record starts
        (``_checkpoint_offset``, which torch's own mmap-based DCP reader uses). Without that offset
        (another torch), the chunk is loaded with a copy. Chunks stored through stream transforms
        (compression) go through DCP's reader, which undoes them.
        """
        info = self.metadata.storage_data[dcp_metadata.MetadataIndex(fqn, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            return self._read(fqn, entry, list(chunk.offsets), list(chunk.sizes))
        path = self.iter_dir / info.relative_path
        try:
            layout = _load_window(path, info.offset, info.length, "meta")
            record = getattr(layout.untyped_storage(), "_checkpoint_offset", None) \
                if isinstance(layout, torch.Tensor) else None
            if record is None:
                tensor = _load_window(path, info.offset, info.length, "cpu")
            else:
                tensor = self._mapped_view(path, info.offset, info.length, record, layout)
        except Exception as error:  # a damaged pickle makes torch's unpickler raise anything (IndexError, ...)
            raise _unreadable(fqn, error, path)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes) \
                or tensor.dtype != entry.properties.dtype:
            raise BadInputError(f"'{fqn}' chunk at {tuple(chunk.offsets)} does not hold the tensor .metadata "
                                f"describes ({tuple(chunk.sizes)}, {entry.properties.dtype})", path)
        return tensor

    def _mapped_view(self, path: Path, start: int, length: int, record: int, layout: torch.Tensor) -> torch.Tensor:
        """``layout`` (a meta tensor) on the bytes of its storage record, ``record`` bytes into the chunk."""
        nbytes = layout.untyped_storage().nbytes()
        if record < 0 or record + nbytes > length:
            raise ValueError(f"storage record of {nbytes} bytes at {record} runs past the chunk's {length} bytes")
        if nbytes == 0:
            return torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype)
        if path not in self._maps:
            self._maps[path] = map_for_reading(path)
        mapping = self._maps[path]
        if start + record + nbytes > len(mapping):
            raise ValueError("the data file is shorter than .metadata says")
        data = torch.frombuffer(memoryview(mapping)[start + record:start + record + nbytes], dtype=torch.uint8)
        return data.view(layout.dtype).as_strided(layout.shape, layout.stride(), layout.storage_offset())

    def _read(self, fqn: str, entry: dcp_metadata.TensorStorageMetadata, offsets: list[int],
              sizes: list[int]) -> torch.Tensor:
        destination = torch.empty(sizes, dtype=entry.properties.dtype)
        region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=destination.shape)
        items = create_read_items_for_chunk_list(fqn, entry, [region])
        try:
            self._reader.read_data(LoadPlan(items), _RegionPlanner(destination)).wait()
        except Exception as error:  # DCP's reader on damaged chunks: whatever torch.load raises
            files = sorted({self.metadata.storage_data[item.storage_index].relative_path for item in items})
            raise _unreadable(fqn, error, self.iter_dir / files[0])
        return destination


def _global_entries(name: str, fqn: str, entry: dcp_metadata.TensorStorageMetadata, key_schema: str) -> dict:
    """A key outside the decoder's layers (``name``, stored as ``fqn``): itself, or a multi-token prediction layer's
    tensor by its canonical name (its experts one entry each, on the key's leading expert axis)."""
    mtp = schema.MTP_LAYER.match(name)
    expert = _STACKED_EXPERT.match(mtp.group(2)) if mtp else None
    if expert:
        prefix = mtp.group(1) + schema.MTP_TRANSFORMER_LAYER
        return {(None, f"{prefix}mlp.experts.local_experts.{e}.{expert.group(1)}.{expert.group(2)}"): _Stored(fqn, (e,))
                for e in range(entry.size[0])}
    return {(None, schema.canonical_name(name, key_schema)[1]): _Stored(fqn, ())}


def _load_window(path: Path, start: int, length: int, map_location: str) -> Any:
    """``torch.load`` (weights only) of bytes ``[start, start + length)`` of a file."""
    with open(path, "rb", buffering=0) as handle:
        return torch.load(io.BufferedReader(_FileWindow(handle, start, length)), map_location=map_location,
                          weights_only=True)


def _unreadable(fqn: str, error: Exception, path: Path) -> BadInputError:
    return BadInputError(f"cannot read '{fqn}', the file is truncated or corrupt ({reason(error, 120)})", path)


class _FileWindow(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a read-only seekable file."""

    def __init__(self, handle: io.RawIOBase, start: int, length: int) -> None:
        super().__init__()
        self._handle, self._start, self._length, self._position = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[:max(0, self._length - self._position)]
        self._handle.seek(self._start + self._position)
        count = self._handle.readinto(view) or 0
        self._position += count
        return count


def _enclosing_chunk(entry: dcp_metadata.TensorStorageMetadata,
                     index: tuple[int, ...]) -> ChunkStorageMetadata | None:
    """The one stored chunk holding the whole slice at ``index`` (all of the trailing axes), if any."""
    for chunk in entry.chunks:
        leading = all(start <= i < start + size for i, start, size in zip(index, chunk.offsets, chunk.sizes))
        trailing = all(start == 0 and size == full for start, size, full in
                       zip(chunk.offsets[len(index):], chunk.sizes[len(index):], entry.size[len(index):]))
        if leading and trailing:
            return chunk
    return None


_TOWER_STACKED = re.compile(r"^(.+\.decoder\.layers\.)(?!\d+\.)(.+)$")  # vision_model.decoder.layers.<rel> [L, ...]


def _tower_entries(fqn: str, entry: Any, schema_name: str) -> dict[tuple[int | None, str], "_Stored"]:
    """A tower's key (``model.family.Tower``): itself, or, stacked as megatron-core's blocks stack their layers, one
    whole key a layer (``vision_model.decoder.layers.N.<rel>``, norms in local-spec names)."""
    stacked = _TOWER_STACKED.match(fqn)
    if not stacked:
        return {(None, fqn): _Stored(fqn, ())}
    rel = schema.canonical_name(f"{schema.LAYER_PREFIX}0.{stacked.group(2)}", schema_name)[1]
    return {(None, f"{stacked.group(1)}{layer}.{rel}"): _Stored(fqn, (layer,)) for layer in range(entry.size[0])}
