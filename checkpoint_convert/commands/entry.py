"""The console commands (``megatron-hf-convert``, ``-inspect``, ``-verify``) and ``python -m checkpoint_convert``.

Before torch is imported, the process is tuned for streaming (``runtime.tune_torch_for_streaming``);
then every model family is registered by importing its package. Families are found, not listed: a
family is a top-level package shipped beside this core that has a ``family`` module. From a source
checkout (run in place, or installed editable) they are the checkout's directories; from an installed
wheel, the packages its file list (``RECORD``) names. So adding ``qwen2/`` with a ``family.py``
registers it everywhere, with no edit to the core or to ``pyproject.toml``; packages of other projects
installed in the same environment are never imported. They are imported in name order.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, NoReturn, Sequence

from ..base.distribution import CORE, installed_files
from ..base.runtime import collector_paused, exit_now, tune_torch_for_streaming  # imports no torch

_FAMILY_MODULE = "family"


def _installed_packages() -> list[str] | None:
    """Top-level packages with a family module in the installed wheel this core runs from."""
    files = installed_files()
    if files is None:
        return None
    return [file.parts[0] for file in files if len(file.parts) == 2 and file.parts[1] == f"{_FAMILY_MODULE}.py"]


def _checkout_packages() -> list[str]:
    """Directories beside the core (its checkout) that are packages with a family module."""
    return [path.name for path in CORE.parent.iterdir()
            if (path / "__init__.py").is_file() and (path / f"{_FAMILY_MODULE}.py").is_file()]


def family_packages() -> list[str]:
    """The names of the family packages shipped with this core, in name order."""
    installed = _installed_packages()
    return sorted(set(installed if installed is not None else _checkout_packages()) - {CORE.name})


def load_families() -> tuple[str, ...]:
    """Tune the process, register every family (importing torch), and return the family names, sorted."""
    tune_torch_for_streaming()
    if str(CORE.parent) not in sys.path and _installed_packages() is None:
        sys.path.append(str(CORE.parent))  # a checkout's families (even one added after an editable install)
    with collector_paused():  # the families import torch
        for package in family_packages():
            importlib.import_module(package)
    from ..model.family import registered
    return tuple(sorted(registered()))


def _run(command: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> NoReturn:
    exit_now(command(sys.argv[1:] if argv is None else argv))


def convert_command(argv: Sequence[str] | None = None, prog: str | None = None) -> NoReturn:
    families = load_families()
    from .cli import run_convert_cli
    _run(lambda args: run_convert_cli(args, families, prog), argv)


def inspect_command(argv: Sequence[str] | None = None, prog: str | None = None) -> NoReturn:
    load_families()
    from .report_cli import run_inspect_cli
    _run(lambda args: run_inspect_cli(args, prog), argv)


def verify_command(argv: Sequence[str] | None = None, prog: str | None = None) -> NoReturn:
    load_families()
    from .report_cli import run_verify_cli
    _run(lambda args: run_verify_cli(args, prog), argv)


COMMANDS = {"convert": convert_command, "inspect": inspect_command, "verify": verify_command}
