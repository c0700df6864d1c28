#!/usr/bin/env python
"""Describe a checkpoint (format, layout, architecture, tensors); --check verifies its integrity."""
import sys

import _bootstrap  # noqa: F401  (registers the families)

from checkpoint_convert.report_cli import run_inspect_cli
from checkpoint_convert.runtime import exit_now

if __name__ == "__main__":
    exit_now(run_inspect_cli(sys.argv[1:]))
