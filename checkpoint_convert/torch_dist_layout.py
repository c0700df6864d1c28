"""The files of a ``torch_dist`` iteration directory, and how to recognise one.

A leaf module (no torch, no project imports): the format dispatch uses it to recognise a directory
before the slow ``torch.distributed.checkpoint`` import, and the torch_dist reader and writer share
its file names.
"""
from __future__ import annotations

from pathlib import Path

BACKEND_FILE = "metadata.json"  # names the sharded backend ("torch_dist")
METADATA_FILE = ".metadata"  # the pickled torch.distributed.checkpoint Metadata
COMMON_FILE = "common.pt"  # Megatron-LM's args, checkpoint version and iteration: no weights


def is_torch_dist_dir(path: Path) -> bool:
    """An iteration directory Megatron-LM saved with ``--ckpt-format torch_dist`` (``common.pt`` beside the data)."""
    return (path / BACKEND_FILE).is_file() and (path / COMMON_FILE).is_file()
