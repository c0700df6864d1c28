"""Errors a user can act on.

``BadInputError`` means the input (or a flag) is wrong: the CLI prints its message as one line and
exits with code 2, leaving the source untouched. Any other exception is an internal error (exit 1).
"""
from __future__ import annotations

import os

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class BadInputError(Exception):
    """Raised for a problem with the user's input: one clear line, naming the file when there is one."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)
EXIT_MISMATCH = 3  # verify: the checkpoints differ; inspect --check: integrity problems found
