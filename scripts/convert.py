#!/usr/bin/env python
"""Convert or reshape a checkpoint: Megatron-LM <-> Hugging Face, or Megatron -> Megatron.

The same command as the installed `megatron-hf-convert` (see checkpoint_convert.entry), run from a checkout.
"""
import _bootstrap  # noqa: F401  (the repository on sys.path, the families registered)

from checkpoint_convert.commands.entry import convert_command

if __name__ == "__main__":
    convert_command()
