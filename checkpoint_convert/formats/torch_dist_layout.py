"""The files of a ``torch_dist`` iteration directory (Megatron-LM's or Megatron-Bridge's), and how to recognise one.

A leaf module (no torch, no project imports): the format dispatch uses it to recognise a directory
before the slow ``torch.distributed.checkpoint`` import, and the torch_dist reader and writer share
its file names.
"""
from __future__ import annotations

from pathlib import Path

BACKEND_FILE = "metadata.json"  # names the sharded backend ("torch_dist")
METADATA_FILE = ".metadata"  # the pickled torch.distributed.checkpoint Metadata
COMMON_FILE = "common.pt"  # Megatron-LM's args, checkpoint version and iteration: no weights
# Megatron-Bridge's: the training configuration (its model: section is the architecture) and train state
RUN_CONFIG_FILE = "run_config.yaml"
TRAIN_STATE_FILE = "train_state.pt"  # in the iteration directory
TRAIN_STATE_TRACKER = "latest_train_state.pt"  # beside the iteration directories, Megatron-Bridge's own tracker
TOKENIZER_DIR = "tokenizer"  # Megatron-Bridge copies the tokenizer into the iteration directory


def is_torch_dist_dir(path: Path) -> bool:
    """An iteration directory Megatron-LM saved with ``--ckpt-format torch_dist`` (``common.pt`` beside the data)."""
    return (path / BACKEND_FILE).is_file() and (path / COMMON_FILE).is_file()


def is_bridge_dir(path: Path) -> bool:
    """An iteration directory Megatron-Bridge saved: torch_dist data described by ``run_config.yaml``.

    Megatron-Bridge 0.6 with megatron-core 0.19 writes no ``common.pt``; with older megatron-core (and
    as written here) there is one, holding no architecture Megatron-Bridge reads: ``run_config.yaml`` decides.
    """
    return (path / BACKEND_FILE).is_file() and (path / RUN_CONFIG_FILE).is_file()
