"""Reading and writing Megatron-LM ``mp_rank_*`` checkpoint trees (the ``torch`` format).

Finding the iteration directory and choosing the reader of its format is ``megatron_formats``'s job.

Reading is lazy: rank files are memory-mapped (``torch.load(mmap=True)``), so a tensor's bytes are
read only when a conversion step asks for it, and ``meta`` views let a whole conversion be planned
from shapes alone.
"""
from __future__ import annotations

import io
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Iterable

import torch

from ..base.errors import BadInputError
from ..base.memory import note_file_mapping
from ..model.parallel import stage_offsets
from . import megatron_schema as schema
from .megatron_args import real_number, whole_number
from .safe_load import InertBytes, safe_torch_load
from .sinks import DISK, DiskSink
from .torch_zip_writer import StreamingTorchFile

TRACKER = "latest_checkpointed_iteration.txt"
GROUPED_MLP = {"mlp.experts.weight1": "linear_fc1", "mlp.experts.weight2": "linear_fc2"}
MODEL_FILES = ("model_optim_rng.pt", "model_rng.pt")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})((?:_\d{3}){0,2})$")
_CHUNK_KEY = re.compile(r"model(\d+)")
EXTRA_STATE = "_extra_state"


def iteration_dir_name(iteration: str | int) -> str:
    return "release" if str(iteration) == "release" else f"iter_{int(iteration):07d}"


def iteration_number(dir_name: str) -> int | str:
    """Inverse of :func:`iteration_dir_name` (``release`` stays ``release``); 0 for another name."""
    match = re.fullmatch(r"iter_(\d+)", dir_name)
    return int(match.group(1)) if match else "release" if dir_name == "release" else 0


def rank_dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    """``mp_rank_TT``, ``_PPP`` appended when PP > 1, ``_EEE`` appended when EP > 1."""
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


def has_rank_dirs(path: Path) -> bool:
    """An iteration directory of the ``torch`` format: ``mp_rank_*`` directories."""
    return path.is_dir() and any(_RANK_DIR.match(child.name) for child in path.iterdir())


@dataclass(frozen=True)
class RankKey:
    tp: int
    pp: int
    ep: int


def _model_file(rank_dir: Path) -> Path | None:
    for name in MODEL_FILES:
        if (rank_dir / name).is_file():
            return rank_dir / name
    return None


def _rank_for(name: str, pp_size: int, ep_size: int, where: Path) -> RankKey:
    match = _RANK_DIR.match(name)
    tp = int(match.group(1))
    extra = [int(part) for part in match.group(2).split("_") if part]
    if len(extra) == 2 and pp_size > 1 and ep_size > 1:
        return RankKey(tp, extra[0], extra[1])
    if len(extra) == 1 and pp_size > 1 and ep_size == 1:
        return RankKey(tp, extra[0], 0)
    if len(extra) == 1 and ep_size > 1 and pp_size == 1:
        return RankKey(tp, 0, extra[0])
    if not extra and pp_size == 1 and ep_size == 1:
        return RankKey(tp, 0, 0)
    raise BadInputError(
        f"rank directory {name} does not fit the args' layout (PP={pp_size}, EP={ep_size})", where)


def _first_model_file(iter_dir: Path, rank_dirs: list[Path]) -> Path:
    for rank_dir in rank_dirs:
        if rank_dir.name in ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000"):
            found = _model_file(rank_dir)
            if found:
                return found
    raise BadInputError("no model_optim_rng.pt in mp_rank_00 or mp_rank_00_000", iter_dir)


def model_key(chunk: int, vpp: int) -> str:
    """The rank-file key of a model chunk: ``model`` without a virtual pipeline, else ``model{chunk}``."""
    return "model" if vpp == 1 else f"model{chunk}"


def virtual_stage(pp_rank: int, chunk: int, pp: int) -> int:
    """Pipeline stage of chunk ``chunk`` of rank ``pp_rank``: Megatron's interleaved order (all ranks'
    chunk 0, then all ranks' chunk 1, ...); :func:`stage_place` is its inverse."""
    return chunk * pp + pp_rank


def stage_place(stage: int, pp: int) -> tuple[int, int]:
    """(pipeline rank, chunk) holding a pipeline stage."""
    chunk, pp_rank = divmod(stage, pp)
    return pp_rank, chunk


def parallel_sizes(args: Any, file: Path) -> tuple[int, int, int]:
    """(TP, PP, EP) the args were saved with; unset means 1."""
    names = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
    return tuple(whole_number(getattr(args, name, None) or 1, name, file) for name in names)


def checkpoint_version(header: dict, file: Path, default: float) -> float:
    """The file's checkpoint_version: Megatron-LM's are 0 to 3.0; a negative one would be read as version 0."""
    version = real_number(header.get("checkpoint_version", default) or default, "checkpoint_version", file)
    if version < 0:
        raise BadInputError(f"checkpoint_version is {version:g}, not a Megatron-LM checkpoint version (0 or more)", file)
    return version


def _model_chunks(header: dict, args: Any, file: Path) -> int:
    """How many model chunks (virtual pipeline stages) each rank file holds; a plain ``model`` is one."""
    if "model" in header:
        return 1
    found = sorted(int(match.group(1)) for key in header if (match := _CHUNK_KEY.fullmatch(str(key))))
    if not found:
        raise BadInputError("checkpoint has no 'model' state dict", file)
    if found != list(range(len(found))):
        raise BadInputError(f"model chunks {', '.join(f'model{i}' for i in found)} are not model0..model{len(found) - 1}",
                            file)
    stated = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if stated and whole_number(stated, "virtual_pipeline_model_parallel_size", file) != len(found):
        raise BadInputError(f"the file holds {len(found)} model chunks but args say "
                            f"virtual_pipeline_model_parallel_size={stated}", file)
    return len(found)


class MegatronTree:
    """The rank files of one iteration directory, opened lazily, with their ``args``.

    ``tensor(rank, canonical, layer)`` gives a shard by canonical name (mcore local schema,
    layer index local to the rank's pipeline stage).

    With a virtual pipeline every rank file holds several model chunks (``model0``, ``model1``, ...),
    each a pipeline stage of its own: chunk ``v`` of pipeline rank ``p`` is stage ``v * PP + p``
    (Megatron's interleaved order), and ``RankKey.pp`` counts these stages.
    """

    ckpt_format = "torch"
    producer = "megatron"  # the tool that wrote the checkpoint
    tokenizer_dir: Path | None = None  # Megatron-LM keeps no tokenizer in its checkpoints

    def __init__(self, iter_dir: Path, trust: bool = False) -> None:
        self.iter_dir = iter_dir
        self.trust = trust
        rank_dirs = sorted(p for p in self.iter_dir.iterdir() if p.is_dir() and _RANK_DIR.match(p.name))
        first = _first_model_file(self.iter_dir, rank_dirs)
        header = self._load(first)
        if "args" not in header or header["args"] is None:
            raise BadInputError("checkpoint has no 'args'; it cannot be converted without them", first)
        self.args, self.args_file = header["args"], first
        self.version = checkpoint_version(header, first, default=0.0)
        self.iteration = header.get("iteration", 0)
        self.tp, self.pp, self.ep = self.args_layout = parallel_sizes(self.args, first)
        self.vpp = _model_chunks(header, self.args, first)
        self.files, self._chunks = self._index_stages(self._index_rank_files(rank_dirs))
        self._states: dict[RankKey, dict[str, Any]] = {}
        self._names: dict[RankKey, dict[tuple[int | None, str], str]] = {}
        # the header's tensors are kept, not loaded again: a mapping registered as read-only must
        # live as long as its registration (``memory.read_only_file_mappings``)
        self._index_chunks(first, header)
        self.schema = schema.detect_schema(list(self._flat(RankKey(0, 0, 0))))
        self.prefix = ""  # a multi-tower model's language-model prefix (``within``)

    def within(self, prefix: str) -> None:
        """Read the language model under ``prefix`` (``FamilySpec.megatron_prefix``): its keys lose the prefix, the
        other towers' keys stay whole (their layers' norms in local-spec names)."""
        self.prefix, self._names = prefix, {}
        self.schema = schema.detect_schema([key[len(prefix):] for key in self._flat(RankKey(0, 0, 0))
                                            if key.startswith(prefix)])

    def _load(self, file: Path) -> dict:
        state = safe_torch_load(file, trust=self.trust)
        note_file_mapping(file)  # memory-mapped by torch.load, which never writes to it
        if not isinstance(state, dict):
            raise BadInputError("not a Megatron checkpoint (top level is not a dict)", file)
        return state

    def _index_stages(self, files: dict[RankKey, Path]) -> tuple[dict[RankKey, Path], dict[RankKey, str]]:
        """Per pipeline stage (a virtual one with model chunks): its file, and the key of its model there."""
        stages, chunks = {}, {}
        for rank, file in files.items():
            for chunk in range(self.vpp):
                stage = RankKey(rank.tp, virtual_stage(rank.pp, chunk, self.pp), rank.ep)
                stages[stage], chunks[stage] = file, model_key(chunk, self.vpp)
        return stages, chunks

    def _index_rank_files(self, rank_dirs: list[Path]) -> dict[RankKey, Path]:
        files: dict[RankKey, Path] = {}
        for rank_dir in rank_dirs:
            file = _model_file(rank_dir)
            if file is None:
                continue  # e.g. a distributed-optimizer dir holding only optim.pt
            files[_rank_for(rank_dir.name, self.pp, self.ep, self.iter_dir)] = file
        expected = {RankKey(t, p, e) for t in range(self.tp) for p in range(self.pp) for e in range(self.ep)}
        missing, extra = expected - set(files), set(files) - expected
        if missing:
            names = sorted(rank_dir_name(r.tp, r.pp, r.ep, self.pp, self.ep) for r in missing)
            raise BadInputError(
                f"missing rank files for {', '.join(names)} (args say TP={self.tp} PP={self.pp} EP={self.ep})",
                self.iter_dir)
        if extra:
            names = sorted(files[r].parent.name for r in extra)
            raise BadInputError(f"unexpected rank directories {', '.join(names)} for TP={self.tp} PP={self.pp} "
                                f"EP={self.ep}", self.iter_dir)
        return files

    def _flat(self, rank: RankKey) -> dict[str, Any]:
        """The flat state of a stage; a file's other model chunks are indexed with it (one load a file)."""
        if rank not in self._states:
            self._index_chunks(self.files[rank], self._load(self.files[rank]))
        return self._states[rank]

    def _index_chunks(self, file: Path, state: dict) -> None:
        """Keep the flat model of every stage a loaded rank file holds (the rest of the file is dropped)."""
        for stage in (stage for stage, path in self.files.items() if path == file):
            model = state.get(self._chunks[stage])
            if not isinstance(model, dict):
                raise BadInputError(f"checkpoint has no '{self._chunks[stage]}' state dict", file)
            self._states[stage] = dict(schema.flatten(model))

    def names(self, rank: RankKey) -> dict[tuple[int | None, str], str]:
        """Canonical (local layer, key) -> stored flat key, for every weight of a rank file."""
        if rank not in self._names:
            table = {}
            flat = self._flat(rank)
            for stored, value in list(flat.items()):
                if schema.is_ignored(stored) or not isinstance(value, torch.Tensor):
                    continue
                layer, canonical = self._canonical(stored)
                if canonical in GROUPED_MLP:
                    table.update(self._split_grouped_mlp(flat, stored, layer, canonical))
                else:
                    table[(layer, canonical)] = stored
            self._names[rank] = table
        return self._names[rank]

    def _canonical(self, stored: str) -> tuple[int | None, str]:
        """(local layer, canonical name); with a language-model prefix, another tower's key whole."""
        if not self.prefix:
            return schema.canonical_name(stored, self.schema)
        if stored.startswith(self.prefix):
            return schema.canonical_name(stored[len(self.prefix):], self.schema)
        return None, schema.tower_canonical_name(stored)

    def _split_grouped_mlp(self, flat: dict[str, Any], stored: str, layer: int | None,
                           canonical: str) -> dict[tuple[int | None, str], str]:
        """GroupedMLP keeps all local experts in one tensor: expose each expert as its own entry.

        ``weight1`` [hidden, experts*fc1] is used as a view [experts, hidden, fc1] and ``weight2``
        [experts*fc2, hidden] as [experts, fc2, hidden] (megatron-core's GroupedMLP.forward): each
        expert's slice is the transpose of its linear layer's weight.
        """
        experts = getattr(self.args, "num_experts", None)
        if not experts:
            raise BadInputError(f"'{stored}' is a GroupedMLP tensor but args have no num_experts", self.iter_dir)
        local_experts = whole_number(experts, "num_experts", self.args_file) // self.ep
        hidden = whole_number(getattr(self.args, "hidden_size", None), "hidden_size", self.args_file)
        if local_experts < 1 or flat[stored].numel() % (local_experts * hidden):
            raise BadInputError(f"'{stored}' {list(flat[stored].shape)} does not hold {local_experts} experts of "
                                f"hidden size {hidden}", self.args_file)
        grouped = flat[stored]
        by_expert = (grouped.reshape(local_experts, hidden, -1) if canonical == "mlp.experts.weight1"
                     else grouped.reshape(local_experts, -1, hidden))
        linear = GROUPED_MLP[canonical]
        entries = {}
        for expert in range(local_experts):
            virtual = f"{stored}#expert{expert}"
            flat[virtual] = by_expert[expert].t()
            entries[(layer, f"mlp.experts.local_experts.{expert}.{linear}.weight")] = virtual
        return entries

    def stage_layer_counts(self) -> list[int]:
        """Layers actually present in each pipeline stage's files."""
        counts = []
        for stage in range(self.pp * self.vpp):
            rank = RankKey(0, stage, 0)
            layers = {layer for layer, _ in self.names(rank) if layer is not None}
            if layers and layers != set(range(len(layers))):
                raise BadInputError(f"layer indices {sorted(layers)}{self._in_chunk(rank, ' of ')} are not 0..N-1",
                                    self.files[rank])
            counts.append(len(layers))
        return counts

    def tensor(self, rank: RankKey, canonical: str, layer: int | None, meta: bool = False) -> torch.Tensor:
        """A shard (memory-mapped), or a ``meta`` tensor of its shape and dtype."""
        stored = self.names(rank).get((layer, canonical))
        if stored is None:
            where = f"layer {layer} " if layer is not None else ""
            raise BadInputError(f"{where}tensor '{canonical}' is missing", self.files[rank])
        tensor = self._flat(rank)[stored]
        return torch.empty_like(tensor, device="meta") if meta else tensor

    def all_weight_names(self, rank: RankKey) -> Iterable[tuple[int | None, str]]:
        return self.names(rank).keys()

    def extra_states(self) -> list[tuple[str, str, int, str]]:
        """Every ``_extra_state`` entry: (name with the global layer, form, bytes, rank directory).

        Transformer Engine stores its FP8 scaling state there: an ``io.BytesIO`` (loaded as
        :class:`~checkpoint_convert.safe_load.InertBytes`), a ``uint8`` tensor or None. No
        conversion reads it; this tells what a checkpoint carries.
        """
        offsets = stage_offsets(self.stage_layer_counts())
        found = []
        for rank in self.files:
            for stored, value in self._flat(rank).items():
                if not stored.endswith(EXTRA_STATE):
                    continue
                layer, name = schema.canonical_name(stored, self.schema)
                if layer is not None:
                    name = f"{schema.LAYER_PREFIX}{offsets[rank.pp] + layer}.{name}"
                found.append((name, *opaque_form(value), self.holders(rank, name, layer)[0]))
        return found

    def holders(self, rank: RankKey, canonical: str, layer: int | None) -> list[str]:
        """The rank directory holding a shard (and its model chunk, with a virtual pipeline)."""
        return [self.files[rank].parent.name + self._in_chunk(rank, "/")]

    def _in_chunk(self, rank: RankKey, joiner: str) -> str:
        """``joiner`` and the stage's model chunk (``model1``) with a virtual pipeline; nothing without one."""
        return joiner + self._chunks[rank] if self.vpp > 1 else ""


def opaque_form(value: Any) -> tuple[str, int]:
    """(what it is, its size in bytes) of an entry no conversion reads, such as an extra state."""
    if isinstance(value, InertBytes):
        return "io.BytesIO", value.nbytes
    if isinstance(value, io.BytesIO):  # when another library allowlisted the class itself with torch
        return "io.BytesIO", value.getbuffer().nbytes
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} tensor", value.nbytes
    if value is None:
        return "None", 0
    return type(value).__name__, 0


def reorder_legacy_qkv(shard: torch.Tensor, version: float, local_heads: int, head_dim: int) -> torch.Tensor:
    """Bring one rank's fused QKV rows from an old checkpoint version to the (heads, 3, head_dim) order.

    Version 0 stored (3, heads, head_dim) and version 1.0 (heads, head_dim, 3); 2.0 and later
    already use (heads, 3, head_dim).
    """
    if version >= 2.0:
        return shard
    tail = shard.shape[1:]
    if version < 1.0:
        return shard.reshape(3, local_heads, head_dim, *tail).transpose(0, 1).reshape(-1, *tail)
    return shard.reshape(local_heads, head_dim, 3, *tail).transpose(1, 2).reshape(-1, *tail)


def nest(entries: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """Build the nested ``model`` dict of a rank file from (path, value) pairs."""
    root: dict[str, Any] = {}
    for path, value in entries:
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


DUMMY_OPTIMIZER = {"optimizer": {"step": 0, "param_groups": [{
    "lr": 0.0, "beta1": 0.0, "beta2": 0.0, "eps": 0.0, "weight_decay": 0.0, "correct_bias": False, "params": [],
}]}}


def write_dummy_optimizer_files(release_dir: Path, tp: int, pp: int, dp: int, sink: DiskSink = DISK) -> None:
    """Per data-parallel rank ``mp_rank_TT[_PPP]_DDD/optim.pt`` files for a distributed optimizer."""
    for t in range(tp):
        for p in range(pp):
            for d in range(dp):
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + f"_{d:03d}"
                sink.torch_save(DUMMY_OPTIMIZER, release_dir / name / "optim.pt")


def write_tracker(root: Path, iteration: str | int, sink: DiskSink = DISK) -> None:
    """The tracker goes last: a tree without it does not look like a finished checkpoint."""
    sink.write_text(root / TRACKER, f"{iteration}\n" if str(iteration) != "release" else "release")


def model_file_name(use_distributed_optimizer: bool) -> str:
    return "model_rng.pt" if use_distributed_optimizer else "model_optim_rng.pt"


def rank_file_path(root: Path, iteration: str | int, rank: RankKey, pp_size: int, ep_size: int,
                   file_name: str) -> Path:
    return root / iteration_dir_name(iteration) / rank_dir_name(rank.tp, rank.pp, rank.ep, pp_size, ep_size) / file_name



def rank_file_of(stage: RankKey, pp_size: int) -> RankKey:
    """The rank file (by pipeline rank) holding a pipeline stage's shard (a model chunk of it, with a virtual
    pipeline)."""
    return RankKey(stage.tp, stage_place(stage.pp, pp_size)[0], stage.ep)


class MegatronWriter:
    """Streams every planned tensor straight into its rank file; each file's pickle is written once
    the file has all its tensors. Memory holds one tensor at a time, whatever the layout.

    Planned keys name pipeline stages; with a virtual pipeline (``layout.vpp`` > 1), stage ``s`` is
    the model chunk ``model{s // PP}`` of pipeline rank ``s % PP``'s file, which stays open until
    its last chunk is written. ``files``: the rank files this process writes when several processes
    share a conversion (None: all of them); the files holding no tensor are written by ``finish``."""

    def __init__(self, root: Path, planned: list[tuple[tuple[RankKey, tuple[str, ...]], tuple, torch.dtype]],
                 args: Any, schema_name: str, layout: Any, distributed_optimizer: bool = False,
                 zip_crc32: bool = False, iteration: str | int = "release", sink: DiskSink = DISK,
                 files: Container[RankKey] | None = None) -> None:
        self.root, self.args, self.schema, self.layout, self.sink = root, args, schema_name, layout, sink
        self.pp_size, self.ep_size, self.iteration = layout.pp, layout.ep, iteration
        self.distributed_optimizer, self.zip_crc32 = distributed_optimizer, zip_crc32
        self.file_name = model_file_name(distributed_optimizer)
        self._expected: dict[RankKey, int] = {}
        for (stage, _), _, _ in planned:
            rank = rank_file_of(stage, self.pp_size)
            self._expected[rank] = self._expected.get(rank, 0) + 1
        self._entries: dict[RankKey, list[tuple[str, tuple[str, ...], Any]]] = {
            rank: [] for rank in self._expected if files is None or rank in files}
        self._files: dict[RankKey, StreamingTorchFile] = {}
        self.files_written: list[Path] = []

    def _placement(self, stage: RankKey) -> tuple[RankKey, str]:
        """The rank file (by pipeline rank) and the model key inside it of a pipeline stage."""
        return rank_file_of(stage, self.pp_size), model_key(stage_place(stage.pp, self.pp_size)[1], self.layout.vpp)

    def write(self, key: tuple[RankKey, tuple[str, ...]], tensor: torch.Tensor) -> None:
        (rank, chunk), path = self._placement(key[0]), key[1]
        self._entries[rank].append((chunk, path, self._file(rank).add(tensor)))
        if len(self._entries[rank]) == self._expected[rank]:
            self._flush(rank)

    def _file(self, rank: RankKey) -> StreamingTorchFile:
        if rank not in self._files:
            file = rank_file_path(self.root, self.iteration, rank, self.pp_size, self.ep_size, self.file_name)
            self._files[rank] = StreamingTorchFile(file, self.zip_crc32, self.sink)
        return self._files[rank]

    def _write_empty_ranks(self) -> None:
        """A rank file for every pipeline rank holding no tensor (stages of no layers), as Megatron saves."""
        for tp, pp_rank, ep in itertools.product(range(self.layout.tp), range(self.pp_size), range(self.ep_size)):
            rank = RankKey(tp, pp_rank, ep)
            if rank not in self._expected:
                self._entries[rank] = []
                self._file(rank)
                self._flush(rank)

    def _flush(self, rank: RankKey) -> None:
        entries = self._entries.pop(rank)
        chunks = [model_key(chunk, self.layout.vpp) for chunk in range(self.layout.vpp)]
        models = {}
        for index, chunk in enumerate(chunks):
            placed = [(path, value) for held_by, path, value in entries if held_by == chunk]
            weight_keys = [".".join(path) for path, _ in placed]
            last_stage = rank.pp == self.pp_size - 1 and index == len(chunks) - 1
            placed += [((key,), None) for key in schema.extra_state_keys(weight_keys, self.schema, last_stage)]
            models[chunk] = nest(placed)
        file = self._files.pop(rank)
        file.close({"args": self.args, "checkpoint_version": 3.0, "iteration": 0, **models})
        self.files_written.append(file.path)

    def close_files(self) -> None:
        """Every rank file of this writer's must be complete (each is closed by its last tensor)."""
        if self._entries:
            raise RuntimeError(f"rank files left incomplete: {sorted(map(str, self._entries))}")

    def finish(self, parts: list[Any] | None = None) -> None:
        """The files beside the tensors' rank files: those of ranks holding no tensor, the distributed
        optimizer's, and the tracker, last."""
        self._write_empty_ranks()
        if self.distributed_optimizer:
            write_dummy_optimizer_files(self.iteration_dir, self.layout.tp, self.pp_size, self.layout.dp, self.sink)
        write_tracker(self.root, self.iteration, self.sink)

    @property
    def iteration_dir(self) -> Path:
        return self.root / iteration_dir_name(self.iteration)
