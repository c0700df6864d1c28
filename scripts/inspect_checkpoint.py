#!/usr/bin/env python
"""Describe a checkpoint (format, layout, architecture, tensors, provenance); --check verifies its integrity.

The same command as the installed `megatron-hf-inspect` (see checkpoint_convert.entry), run from a checkout.
"""
import _bootstrap  # noqa: F401  (the repository on sys.path, the families registered)

from checkpoint_convert.commands.entry import inspect_command

if __name__ == "__main__":
    inspect_command()
