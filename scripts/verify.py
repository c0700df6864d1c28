#!/usr/bin/env python
"""Compare two checkpoints of any formats and layouts; exit 0 only when they hold the same model.

The same command as the installed `megatron-hf-verify` (see checkpoint_convert.entry), run from a checkout.
"""
import _bootstrap  # noqa: F401  (the repository on sys.path, the families registered)

from checkpoint_convert.commands.entry import verify_command

if __name__ == "__main__":
    verify_command()
