"""Output safety: never write into the source, never leave a half-written output that looks complete.

Everything is written into a hidden temporary sibling of the save path and renamed into place only
after the last file (for Megatron, the tracker) is written. An interrupted run removes it; a killed run leaves
a ``.NAME.partial-*`` directory, which the next run names, and removes when it is certainly a dead run's (see
``claim``, which also keeps a second run off the save path). ``--overwrite`` replaces only a directory
that holds a checkpoint and nothing else, and the old one is removed only once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..base.errors import BadInputError
from ..formats.hf_io import CONFIG, TOKENIZER_FILES, is_hf_checkpoint
from ..formats.megatron_formats import is_megatron_checkpoint
from ..formats.torch_dist_layout import RUN_CONFIG_FILE, TOKENIZER_DIR, TRAIN_STATE_FILE, TRAIN_STATE_TRACKER
from .claim import clear_stale_staging, mark_staging, unmark_staging
from .provenance import RECORD_FILE

DISK_MARGIN = 64 * 1024 * 1024
_ITERATION = r"(?:release|iter_\d{7})"
_RANK = r"mp_rank_\d{2}(?:_\d{3}){0,2}"
_SHARD = r"-\d{5}-of-\d{5}"
_TOKENIZER = "|".join(map(re.escape, TOKENIZER_FILES))
# Every path (relative to the save path) a checkpoint directory may hold: a Megatron tree or iteration
# directory (rank files, distributed-optimizer files, torch_dist files, Megatron-Bridge's files), or a
# Hugging Face model; either with this tool's provenance record.
CHECKPOINT_PATHS = re.compile("|".join([
    r"latest_checkpointed_iteration\.txt", re.escape(TRAIN_STATE_TRACKER),
    rf"(?:{_ITERATION}/)?{re.escape(RECORD_FILE)}",
    rf"{_ITERATION}/(?:{re.escape(RUN_CONFIG_FILE)}|{re.escape(TRAIN_STATE_FILE)})",
    rf"{_ITERATION}/{TOKENIZER_DIR}(?:/(?:{_TOKENIZER}))?",
    rf"(?:{_ITERATION}/)?{_RANK}(?:/(?:model_optim_rng|model_rng|optim|distrib_optim)\.pt)?",
    rf"(?:{_ITERATION}/)?(?:common\.pt|metadata\.json|\.metadata|__\d+_\d+\.distcp)",
    _ITERATION,
    rf"{re.escape(CONFIG)}|generation_config\.json",
    rf"model(?:{_SHARD})?\.safetensors|model\.safetensors\.index\.json",
    rf"pytorch_model(?:{_SHARD})?\.bin|pytorch_model\.bin\.index\.json",
    _TOKENIZER,
]))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_paths(load_path: Path, save_path: Path, overwrite: bool) -> None:
    """Refuse a save path that overlaps the load path, holds the working or home directory, or holds
    files without --overwrite; with it, one that holds anything but a checkpoint."""
    load, save = load_path.resolve(), save_path.resolve()
    if _inside(save, load) or _inside(load, save):
        raise BadInputError("save path must not equal, contain or lie inside the load path", save_path)
    if save.exists() and not save.is_dir():
        raise BadInputError("save path exists and is not a directory", save_path)
    for what, directory in (("working", Path.cwd()), ("home", Path(os.path.expanduser("~")))):
        if save.exists() and _inside(directory.resolve(), save):
            raise BadInputError(f"save path is or contains the {what} directory; it is never replaced", save_path)
    if save.is_dir() and any(save.iterdir()):
        if not overwrite:
            raise BadInputError("save path is not empty; pass --overwrite to replace it", save_path)
        stray = _not_checkpoint(save)
        if stray:
            raise BadInputError(f"--overwrite replaces only a directory holding a checkpoint and nothing else; "
                                f"it would delete {stray}", save_path)


def _not_checkpoint(directory: Path) -> str | None:
    """A file (relative path) in ``directory`` that is not part of a checkpoint, or why it holds none."""
    for root, dirs, files in os.walk(directory):  # symbolic links are entries, never followed
        dirs.sort()
        leaves = [name for name in dirs if os.path.islink(os.path.join(root, name))
                  or not os.listdir(os.path.join(root, name))]
        for name in sorted(files) + leaves:
            relative = (Path(root) / name).relative_to(directory).as_posix()
            if not CHECKPOINT_PATHS.fullmatch(relative):
                return relative
    if not (is_megatron_checkpoint(directory) or (is_hf_checkpoint(directory) and _has_hf_weights(directory))):
        return f"{min(p.name for p in directory.iterdir())}, which belongs to no complete checkpoint"
    return None


def _has_hf_weights(directory: Path) -> bool:
    return any(path.suffix in (".safetensors", ".bin") for path in directory.iterdir())


def check_free_space(directory: Path, needed_bytes: int) -> int:
    """The free bytes where the output goes (``directory`` or its nearest existing parent); refuses too few."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed_bytes + DISK_MARGIN > free:
        raise BadInputError(f"needs {needed_bytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are free", directory)
    return free


@contextlib.contextmanager
def staged_directory(save_path: Path, needed_bytes: int) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``save_path`` only if the block completes."""
    staging = new_staging(save_path, needed_bytes)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    put_in_place(staging, save_path)


def new_staging(save_path: Path, needed_bytes: int) -> Path:
    """A new hidden sibling of ``save_path`` to write the output into, once stale ones and the free space are
    checked (see :func:`staged_directory`, and ``distributed``, where several processes share one)."""
    save = save_path.resolve()
    save.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_staging(save)
    check_free_space(save.parent, needed_bytes)
    staging = Path(tempfile.mkdtemp(prefix=f".{save.name}.partial-", dir=save.parent))
    staging.chmod(_mkdir_mode())  # mkdtemp's 0700 would make the finished output private to this user
    mark_staging(staging)
    return staging


def put_in_place(staging: Path, save_path: Path) -> None:
    """Rename the finished ``staging`` directory to ``save_path`` (replacing an old checkpoint there)."""
    unmark_staging(staging)
    _replace(staging, save_path.resolve())


def _mkdir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _replace(staging: Path, save: Path) -> None:
    if save.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{save.name}.old-", dir=save.parent))
        save.rename(old / save.name)
        staging.rename(save)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(save)
