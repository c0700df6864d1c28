"""Errors a user can act on.

``BadInputError`` means the input (or a flag) is wrong: the CLI prints its message as one line and
exits with code 2, leaving the source untouched. Any other exception is an internal error (exit 1).
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path

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


def internal_error_line(error: BaseException) -> str:
    """The one line an internal error (a bug) is reported with: what went wrong and where."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"at {Path(frames[-1].filename).name}:{frames[-1].lineno}; " if frames else ""
    return f"internal error: {reason(error)} ({where}rerun with --debug)"


class ProcessesFailed(Exception):
    """A conversion shared by several processes failed: ``line`` is what to print (by the one process that
    ``speaks``), ``code`` the exit code, the same in every process; ``cause`` is this process's own error when it
    was the one reported (``--debug`` shows its traceback)."""

    def __init__(self, line: str, code: int, cause: BaseException | None = None, speaks: bool = True) -> None:
        super().__init__(line)
        self.line, self.code, self.cause, self.speaks = line, code, cause, speaks
