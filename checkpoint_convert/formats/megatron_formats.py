"""Opening a Megatron checkpoint: find its iteration directory, then open it with its format's reader.

Each format is a :class:`MegatronFormat`: a test that recognises an iteration directory from its
files alone, and the reader that opens it. :data:`FORMATS` lists them most specific first; the first
that recognises a directory opens it. The readers import nothing from here (a reader may build on a
shared one below it: MindSpeed-MM's rank files on ``megatron_io``'s rank-file helpers); slow imports
(``torch.distributed.checkpoint``) happen only when a reader of that format is opened.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..base.errors import BadInputError
from .megatron_io import TRACKER, MegatronTree, has_rank_dirs, iteration_dir_name
from .mindspeed_mm import MindSpeedTree, is_mindspeed_mm_dir
from .safe_load import safe_torch_load
from .torch_dist_layout import TRAIN_STATE_TRACKER, is_bridge_dir, is_torch_dist_dir

_ITERATION_DIR = re.compile(r"^(release|iter_\d{7})$")


def _open_torch_dist(iter_dir: Path, trust: bool) -> Any:
    from .torch_dist import open_torch_dist  # torch.distributed.checkpoint is slow to import: only when needed
    return open_torch_dist(iter_dir, trust)


def _open_bridge(iter_dir: Path, trust: bool) -> Any:
    from .torch_dist import open_bridge
    return open_bridge(iter_dir, trust)


@dataclass(frozen=True)
class MegatronFormat:
    """One on-disk format of a Megatron iteration directory."""

    name: str
    recognises: Callable[[Path], bool]  # from the directory's files alone, without loading any
    open: Callable[[Path, bool], Any]  # (iteration dir, trust) -> a tree the engine reads tensors from


FORMATS: tuple[MegatronFormat, ...] = (
    MegatronFormat("megatron-bridge", is_bridge_dir, _open_bridge),  # torch_dist data: before Megatron-LM's
    MegatronFormat("torch_dist", is_torch_dist_dir, _open_torch_dist),
    MegatronFormat("mindspeed-mm", is_mindspeed_mm_dir, MindSpeedTree),  # rank files without args: before Megatron-LM's
    MegatronFormat("torch", has_rank_dirs, MegatronTree),
)


def format_of(iter_dir: Path) -> MegatronFormat | None:
    """The format of an iteration directory, or None when it holds no Megatron weights."""
    if not iter_dir.is_dir():
        return None
    return next((fmt for fmt in FORMATS if fmt.recognises(iter_dir)), None)


def _iteration_dirs(path: Path) -> list[str]:
    return sorted(child.name for child in path.iterdir() if _ITERATION_DIR.match(child.name) and format_of(child))


def is_megatron_checkpoint(path: Path) -> bool:
    """A Megatron tree (tracker or iteration directories) or an iteration directory itself."""
    return ((path / TRACKER).is_file() or (path / TRAIN_STATE_TRACKER).is_file() or format_of(path) is not None
            or bool(_iteration_dirs(path)))


def _train_state_step(file: Path) -> str:
    """The step Megatron-Bridge's own tracker (a saved ``TrainState``) names."""
    state = safe_torch_load(file, lazy=False)
    try:
        return str(int(state["step"]))
    except (TypeError, KeyError, ValueError, RuntimeError):  # not a dict, no step, not one integer
        raise BadInputError("not a Megatron-Bridge train state (no integer 'step')", file)


def _tracked_iteration(path: Path) -> str:
    """The iteration the tracker names: ``release`` or a number (Megatron-LM's tracker, else Megatron-Bridge's)."""
    tracker = path / TRACKER
    if not tracker.is_file() and (path / TRAIN_STATE_TRACKER).is_file():
        return _train_state_step(path / TRAIN_STATE_TRACKER)
    if not tracker.is_file():
        found = ", ".join(_iteration_dirs(path)) or "none"
        raise BadInputError(f"no {TRACKER}; pass --iteration or the iteration directory itself "
                            f"(iteration directories here: {found})", path)
    iteration = _read_tracker(tracker)
    if iteration != "release" and not iteration.isdigit():
        raise BadInputError(f"tracker holds '{iteration[:40]}', not 'release' or an iteration number", tracker)
    return iteration


def _read_tracker(tracker: Path) -> str:
    """The tracker's text: 'release' or an iteration number (anything longer is not a tracker)."""
    with open(tracker, "rb") as handle:
        raw = handle.read(64)
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BadInputError("tracker is not text ('release' or an iteration number)", tracker)


def find_iteration_dir(path: Path, iteration: str | None = None) -> Path:
    """The directory holding the weights: given directly, named by ``--iteration``, or by the tracker."""
    if iteration is None and format_of(path):
        return path
    iteration = iteration if iteration is not None else _tracked_iteration(path)
    target = path / iteration_dir_name(iteration)
    if format_of(target) is None:
        raise BadInputError(f"iteration {iteration} has no mp_rank_* directories or torch_dist files at "
                            f"{target.name}/", path)
    return target


def open_megatron_tree(path: Path, iteration: str | None = None, trust: bool = False) -> Any:
    """The checkpoint at ``path``, opened by the reader of the format it was saved in."""
    iter_dir = find_iteration_dir(path, iteration)
    return format_of(iter_dir).open(iter_dir, trust)
