"""MindSpeed-MM's rank files (Ascend/MindSpeed-MM ``checkpoint/vlm_model/hf_to_mm.py``, ``mm_to_hf.py``).

``release/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding only ``{'model': flat state dict, 'checkpoint_version':
3.0}`` (its ``save_by_vpp``), tracker ``latest_checkpointed_iteration.txt`` = ``release``. There are no ``args``:
reading one needs the Hugging Face config, as MindSpeed-MM's own ``mm_to_hf`` does. Each tower's layers are
numbered from 0 on each pipeline rank, so every tower's pipeline split is counted from the files' layer keys.
Training saves may hold ``_extra_state`` entries and ``None`` values (``mm_to_hf`` drops them): they are skipped.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Container

import torch

from ..base.errors import BadInputError
from ..base.memory import note_file_mapping
from . import megatron_schema as schema
from .megatron_io import MODEL_FILES, RankKey, iteration_dir_name, iteration_number, write_tracker
from .safe_load import is_zip_checkpoint, safe_torch_load
from .sinks import DISK, DiskSink
from .torch_zip_writer import StreamingTorchFile

MINDSPEED_MM = "mindspeed_mm"  # the key schema's name (``--megatron_format mindspeed_mm``)
LANGUAGE_LAYER = "decoder.layers.{layer}."  # megatron-core GPT's layers, under the language model's prefix
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_MARK = b"text_decoder."  # a key every MindSpeed-MM vision-language model's rank files hold


def _rank_files(iter_dir: Path) -> dict[RankKey, Path]:
    files = {}
    for child in iter_dir.iterdir():
        match = _RANK_DIR.match(child.name)
        model = next((child / name for name in MODEL_FILES if (child / name).is_file()), None) if match else None
        if model is not None:
            files[RankKey(int(match.group(1)), int(match.group(2) or 0), 0)] = model
    return files


def is_mindspeed_mm_dir(iter_dir: Path) -> bool:
    """Rank directories whose first file's pickle names MindSpeed-MM's language model (its ``data.pkl`` record
    read as bytes by torch's zip reader, which skips checksums as ``torch.load`` does; nothing unpickled)."""
    first = _rank_files(iter_dir).get(RankKey(0, 0, 0)) if iter_dir.is_dir() else None
    if first is None or not is_zip_checkpoint(first):
        return False
    try:
        return _MARK in bytes(torch._C.PyTorchFileReader(str(first)).get_record("data.pkl"))
    except RuntimeError:  # not a torch zip file
        return False


class MindSpeedTree:
    """The rank files of a MindSpeed-MM iteration directory, opened lazily (memory-mapped) by flat key."""

    ckpt_format = "torch"
    producer = "mindspeed-mm"
    schema = MINDSPEED_MM
    tokenizer_dir: Path | None = None
    vpp = 1
    version = CHECKPOINT_VERSION

    def __init__(self, iter_dir: Path, trust: bool = False) -> None:
        self.iter_dir, self.trust = iter_dir, trust
        self.files = _rank_files(iter_dir)
        self.tp = 1 + max(rank.tp for rank in self.files)
        self.pp = 1 + max(rank.pp for rank in self.files)
        missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if self.pp > 1 else "") for t in range(self.tp)
                   for p in range(self.pp) if RankKey(t, p, 0) not in self.files]
        if missing:
            raise BadInputError(f"missing rank files for {', '.join(missing)}", iter_dir)
        self.ep = 1
        self.args_layout = (self.tp, self.pp, self.ep)
        self.args, self.args_file = argparse.Namespace(), self.files[RankKey(0, 0, 0)]  # no args: nothing carried
        self.iteration = iteration_number(iter_dir.name)
        self.language_layers = ""  # the language model's layer prefix (set by the source that reads it)
        self._states: dict[RankKey, dict[str, torch.Tensor]] = {}

    def flat(self, rank: RankKey) -> dict[str, torch.Tensor]:
        """A rank file's tensors by flat key (``_extra_state`` entries and ``None`` values left out)."""
        if rank not in self._states:
            state = safe_torch_load(self.files[rank], trust=self.trust)
            note_file_mapping(self.files[rank])
            model = state.get("model") if isinstance(state, dict) else None
            if not isinstance(model, dict):
                raise BadInputError("not a MindSpeed-MM rank file (no 'model' state dict)", self.files[rank])
            self._states[rank] = {key: value for key, value in schema.flatten(model)
                                  if isinstance(value, torch.Tensor) and not schema.is_ignored(key)}
        return self._states[rank]

    def tensor(self, rank: RankKey, key: str, layer: None = None, meta: bool = False) -> torch.Tensor:
        """A shard by flat key (``layer``: always None, the index is in the key, as ``all_weight_names`` gives)."""
        tensor = self.flat(rank).get(key)
        if tensor is None:
            raise BadInputError(f"tensor '{key}' is missing", self.files[rank])
        return torch.empty_like(tensor, device="meta") if meta else tensor

    def all_weight_names(self, rank: RankKey) -> list[tuple[None, str]]:
        """Every tensor's flat key (layers are in the keys: no separate layer index)."""
        return [(None, key) for key in self.flat(rank)]

    def layer_counts(self, layer_prefix: str) -> list[int]:
        """Layers of one tower on each pipeline rank: the indices after ``layer_prefix`` (a format string with
        ``{layer}``), which must be 0..N-1 on each rank."""
        pattern = re.compile(re.escape(layer_prefix).replace(re.escape("{layer}"), r"(\d+)"))
        counts = []
        for stage in range(self.pp):
            rank = RankKey(0, stage, 0)
            layers = {int(match.group(1)) for match in map(pattern.match, self.flat(rank)) if match}
            if layers != set(range(len(layers))):
                raise BadInputError(f"layer indices {sorted(layers)} under {layer_prefix.split('{')[0]} are not "
                                    "0..N-1", self.files[rank])
            counts.append(len(layers))
        return counts

    def stage_layer_counts(self) -> list[int]:
        """The language model's layers on each pipeline rank."""
        return self.layer_counts(self.language_layers)

    def holders(self, rank: RankKey, key: str, layer: None = None) -> list[str]:
        """The rank directory holding a shard (for inspect)."""
        return [self.files[rank].parent.name]

    def extra_states(self) -> list[tuple[str, str, int, str]]:
        """None reported: ``_extra_state`` entries are skipped on reading, as MindSpeed-MM's ``mm_to_hf`` drops them."""
        return []


def rank_dir(tp: int, pp: int, pp_size: int) -> str:
    return f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")


class MindSpeedWriter:
    """Streams every planned tensor into its rank file (keys ``(RankKey, flat key)``); a file's pickle is written
    once it has all its tensors, as ``{'model': flat dict, 'checkpoint_version': 3.0}``; the tracker goes last."""

    def __init__(self, root: Path, planned: list, tp: int, pp: int, sink: DiskSink = DISK,
                 files: Container[RankKey] | None = None, iteration: str = "release") -> None:
        self.root, self.tp, self.pp, self.sink, self.iteration = root, tp, pp, sink, iteration
        self._expected: dict[RankKey, int] = {}
        for (rank, _), _, _ in planned:
            self._expected[rank] = self._expected.get(rank, 0) + 1
        self._entries: dict[RankKey, dict[str, Any]] = {rank: {} for rank in self._expected
                                                        if files is None or rank in files}
        self._files: dict[RankKey, StreamingTorchFile] = {}

    def _file(self, rank: RankKey) -> StreamingTorchFile:
        if rank not in self._files:
            path = self.iteration_dir / rank_dir(rank.tp, rank.pp, self.pp) / MODEL_FILES[0]
            self._files[rank] = StreamingTorchFile(path, True, self.sink)
        return self._files[rank]

    def write(self, key: tuple[RankKey, str], tensor: torch.Tensor) -> None:
        rank, name = key
        self._entries[rank][name] = self._file(rank).add(tensor)
        if len(self._entries[rank]) == self._expected[rank]:
            self._flush(rank)

    def _flush(self, rank: RankKey) -> None:
        model = self._entries.pop(rank)
        self._file(rank).close({"model": model, "checkpoint_version": CHECKPOINT_VERSION})
        del self._files[rank]

    def close_files(self) -> None:
        if self._entries:
            raise RuntimeError(f"rank files left incomplete: {sorted(map(str, self._entries))}")

    def finish(self, parts: list[Any] | None = None) -> None:
        """Rank files of ranks holding no tensor, then the tracker."""
        for tp in range(self.tp):
            for pp in range(self.pp):
                if RankKey(tp, pp, 0) not in self._expected:
                    self._entries[RankKey(tp, pp, 0)] = {}
                    self._flush(RankKey(tp, pp, 0))
        write_tracker(self.root, self.iteration, self.sink)

    @property
    def iteration_dir(self) -> Path:
        return self.root / iteration_dir_name(self.iteration)

