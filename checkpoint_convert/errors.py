"""Errors a user can act on.

``BadInputError`` means the input (or a flag) is wrong: the CLI prints its message as one line and
exits with code 2, leaving the source untouched. Any other exception is an internal error (exit 1).
"""
from __future__ import annotations

import os

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class BadInputError(Exception):
    """Raised for a problem with the user's input: one clear line, naming the file when there is one.

    Messages quote what damaged files hold; characters that are not printable (newlines, NULs, escape
    sequences) are shown escaped, so the message stays one line and the terminal untouched.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        super().__init__(one_line(f"{self.path}: {message}" if self.path else message))


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped as Python would write it."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
EXIT_MISMATCH = 3  # verify: the checkpoints differ; inspect --check: integrity problems found


def reason(error: BaseException, limit: int = 200) -> str:
    """A library error in one short line for a message: its type and the first line of its text."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__
