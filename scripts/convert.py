#!/usr/bin/env python
"""Convert or reshape a checkpoint: Megatron-LM <-> Hugging Face, or Megatron -> Megatron."""
import sys

from _bootstrap import FAMILIES

from checkpoint_convert.cli import run_convert_cli
from checkpoint_convert.runtime import exit_now

if __name__ == "__main__":
    exit_now(run_convert_cli(sys.argv[1:], FAMILIES))
