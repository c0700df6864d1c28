"""Make the repository importable from scripts/ and register every model family (see checkpoint_convert.entry)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint_convert.commands.entry import load_families  # noqa: E402  (imports no torch)

FAMILIES = load_families()
