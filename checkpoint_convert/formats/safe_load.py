"""Load ``.pt`` checkpoint files without executing code from the pickle.

Every load uses ``torch.load(weights_only=True)``. What Megatron checkpoints legitimately hold beyond
tensors is allowlisted: ``argparse.Namespace`` and the stdlib/numpy types in args and RNG state.
Objects of Megatron's own classes (enums such as ``megatron.core.transformer.enums.AttnBackend``)
are loaded as inert :class:`ForeignObject` stand-ins registered under their original names, so no
Megatron install is needed and nothing from the file is imported or run. Transformer Engine's
extra state as older versions wrote it (an ``io.BytesIO`` holding a ``torch.save`` of the FP8
scaling state) loads as :class:`InertBytes`: its bytes, never unpickled. Any other global is
refused with a message naming it and the ``--trust_checkpoint`` opt-in.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import signal
import types
import warnings
import zipfile
from typing import Any

import numpy as np
import torch

from ..base.errors import BadInputError

# Modules whose classes appear in real Megatron args and may be replaced by inert stand-ins.
FOREIGN_MODULE_PREFIXES = ("megatron.", "apex.", "transformer_engine.", "nemo.", "modelopt.")

_MISSING_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


class ForeignObject:
    """Inert stand-in for an object of a class that is not installed (e.g. a Megatron enum).

    It records what the pickle passed to the class (constructor arguments and state) and never
    calls into anything. ``name`` is the original qualified class name.
    """

    original_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The enum value (first constructor argument) when the object is an enum member."""
        return self.args[0] if self.args else self.state

    def __repr__(self) -> str:
        return f"<{self.original_name} {self.value!r}>"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ForeignObject) and other.original_name == self.original_name
                and other.args == self.args and other.state == self.state)

    def __hash__(self) -> int:
        return hash((self.original_name, repr(self.args)))


_STAND_INS: dict[str, type] = {}


def stand_in_for(qualified_name: str) -> type:
    """Return the (cached) inert stand-in class for ``qualified_name``."""
    if qualified_name not in _STAND_INS:
        short = qualified_name.rsplit(".", 1)[-1]
        _STAND_INS[qualified_name] = type(short, (ForeignObject,), {"original_name": qualified_name})
    return _STAND_INS[qualified_name]


class InertBytes:
    """What an ``io.BytesIO`` in a checkpoint loads as: the bytes it held, kept and never parsed.

    Transformer Engine before 1.13 stored each module's ``_extra_state`` as an ``io.BytesIO`` holding
    a ``torch.save`` of its FP8 scaling state (itself a pickle, which TE unpickles without
    restriction). Conversions never need it, so the inner pickle is never opened: only its size
    is reported. A ``BytesIO`` pickles as ``BytesIO.__new__`` plus a state of (value, position,
    attribute dict); this class takes that state and keeps the value if it is bytes.
    """

    original_name = "_io.BytesIO"
    data = b""  # a pickle that never sets the state leaves an empty value

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytes(data)

    def __setstate__(self, state: Any) -> None:
        value = state[0] if isinstance(state, tuple) and state else state
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"an io.BytesIO whose state is {type(value).__name__}, not bytes")
        self.data = bytes(value)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"<io.BytesIO of {self.nbytes} bytes, not unpickled>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InertBytes) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)


def _numpy_globals() -> list:
    """Globals numpy arrays and RNG states pickle to (Megatron stores ``np.random.get_state()``)."""
    names = []
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct"])
            names.append((module._reconstruct, f"{module_name}._reconstruct"))
        except ImportError:
            pass
    names += [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
              type(np.dtype(np.int64))]
    return names


# What Megatron-LM stores beside tensors, each accepted because loading it runs no code from the file:
# attribute bags (args), an enum looked up by value, paths (strings, no file access), numpy arrays of
# plain dtypes (RNG state), extra state kept as bytes, and RNG generators recorded by an inert stand-in
# (a graph-safe RNG tracker stores ``torch.Generator`` objects; building one could need CUDA).
BASE_ALLOWLIST: list = [argparse.Namespace, types.SimpleNamespace, signal.Signals, collections.OrderedDict,
                        pathlib.PosixPath, (InertBytes, InertBytes.original_name),
                        (stand_in_for("torch._C.Generator"), "torch._C.Generator"), *_numpy_globals()]


def is_zip_checkpoint(path: str | os.PathLike) -> bool:
    """True when the file is in torch's zip format (the only one that can be memory-mapped).

    ``zipfile`` raises, rather than answers False, for some damaged end records (a multi-disk archive).
    """
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return False


def _load_with(path: str | os.PathLike, allow: list, mmap: bool) -> Any:
    # torch's context removes on exit every entry it was given: leave alone those the process had allowed
    # already (megatron-core allows argparse.Namespace on import, and loads common.pt with it later)
    present = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([entry for entry in allow if entry not in present]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def safe_torch_load(path: str | os.PathLike, trust: bool = False, lazy: bool = True) -> Any:
    """Load a checkpoint file safely; memory-map its tensors when the file allows it.

    ``trust=True`` opts into a full unpickle (can run code from the file: only for trusted files).
    Raises :class:`BadInputError` for unreadable files and disallowed globals.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadInputError("file is empty or missing", path)
    with open(path, "rb") as handle:
        zip_magic = handle.read(4) == b"PK\x03\x04"
    if zip_magic and not is_zip_checkpoint(path):
        raise BadInputError("truncated or corrupt checkpoint (its zip directory is missing)", path)
    mmap = lazy and zip_magic
    state = _load_allowlisted(path, mmap, trust, zip_magic)
    if lazy and not mmap:
        warnings.warn(f"{path}: not in torch's zip format, so it was loaded fully into memory")
    return state


def _load_allowlisted(path: str, mmap: bool, trust: bool, zip_format: bool) -> Any:
    """Load, adding an inert stand-in for each Megatron global torch reports, until it succeeds."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    allow = list(BASE_ALLOWLIST)
    for _ in range(64):
        try:
            return _load_with(path, allow, mmap)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            missing = _MISSING_GLOBAL.search(str(error))
            if missing is None:
                detail = f" ({_first_line(error)})" if zip_format else ": neither torch's zip format nor a pickle"
                raise BadInputError(f"not a readable torch checkpoint{detail}", path)
            name = missing.group(1)
            if not name.startswith(FOREIGN_MODULE_PREFIXES):
                raise BadInputError(
                    f"pickle needs the global '{name}', which is not allowlisted; "
                    "pass --trust_checkpoint to unpickle it fully (unsafe: runs code from the file)",
                    path)
            allow.append((stand_in_for(name), name))
    raise BadInputError("too many unknown globals in the pickle", path)


def _first_line(error: Exception) -> str:
    """The telling line of a load error (torch's weights-only errors lead with advice, then the reason)."""
    text = str(error)
    reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    lines = reason.strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
