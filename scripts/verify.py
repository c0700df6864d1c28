#!/usr/bin/env python
"""Compare two checkpoints of any formats and layouts; exit 0 only when they hold the same model."""
import sys

import _bootstrap  # noqa: F401  (registers the families)

from checkpoint_convert.report_cli import run_verify_cli
from checkpoint_convert.runtime import exit_now

if __name__ == "__main__":
    exit_now(run_verify_cli(sys.argv[1:]))
