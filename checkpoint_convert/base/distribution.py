"""This tool's own distribution: where its code runs from, and which version it is.

The commands find the family packages beside the core (``commands.entry``) and every output records the
tool's version (``run.provenance``); both need to know whether the running code is an installed wheel or a
checkout, which is decided here once.
"""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "megatron-hf-convert"  # the name pyproject.toml installs this tool under
CORE = Path(__file__).resolve().parent.parent  # the checkpoint_convert package directory


def installed_files() -> list[metadata.PackagePath] | None:
    """The file list of the installed wheel this core runs from; None when it runs from no installed wheel (a
    checkout, an editable install of one, or a checkout beside an installed copy)."""
    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    if distribution.read_text("RECORD") is None:  # a source tree's build metadata (egg-info), not an installed wheel
        return None
    files = distribution.files or []
    runs_these = any(file.parts == (CORE.name, "__init__.py") and Path(str(file.locate())).resolve().parent == CORE
                     for file in files)
    return files if runs_these else None



@functools.lru_cache(maxsize=1)
def tool_version() -> str:
    """This code's version: the installed package's, else ``git describe`` of its checkout, else ``unknown``.

    A package version counts only when the installed files are the ones running (an editable install,
    or a checkout run beside an installed copy, is described by git: its code is the checkout's).
    """
    installed = _installed_version()
    if installed and installed_files() is not None:
        return installed
    return _git_description() or installed or "unknown"


def _installed_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _git_description() -> str | None:
    """``git describe`` of the checkout this package is the top of (a venv inside a clone is not one)."""
    root = CORE.parent
    if not (root / ".git").exists():
        return None
    try:
        described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"git {described}" if described else None
