"""Output safety: never write into the source, never leave a half-written output that looks complete.

Everything is written into a hidden temporary sibling of the save path and renamed into place only
after the last file (for Megatron, the tracker) is written. An interrupted run leaves at most a
``.NAME.partial-*`` directory, which the next run removes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BadInputError

DISK_MARGIN = 64 * 1024 * 1024


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_paths(load_path: Path, save_path: Path, overwrite: bool) -> None:
    """Refuse a save path that overlaps the load path, or one that holds files without --overwrite."""
    load, save = load_path.resolve(), save_path.resolve()
    if _inside(save, load) or _inside(load, save):
        raise BadInputError("save path must not equal, contain or lie inside the load path", save_path)
    if save.exists() and not save.is_dir():
        raise BadInputError("save path exists and is not a directory", save_path)
    if save.is_dir() and any(save.iterdir()) and not overwrite:
        raise BadInputError("save path is not empty; pass --overwrite to replace it", save_path)


def _remove_stale_partials(parent: Path, name: str) -> None:
    for stale in parent.glob(f".{name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


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
    save = save_path.resolve()
    save.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(save.parent, save.name)
    check_free_space(save.parent, needed_bytes)
    staging = Path(tempfile.mkdtemp(prefix=f".{save.name}.partial-", dir=save.parent))
    staging.chmod(_mkdir_mode())  # mkdtemp's 0700 would make the finished output private to this user
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, save)


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
