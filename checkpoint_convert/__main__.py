"""``python -m checkpoint_convert [convert|inspect|verify] ...``: the console commands without their scripts.

Without a command name the arguments are a conversion's, as ``megatron-hf-convert`` takes them.
"""
import sys

from .commands.entry import COMMANDS

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else None
    arguments = sys.argv[2:] if name else sys.argv[1:]
    COMMANDS[name or "convert"](arguments, prog=f"python -m checkpoint_convert {name or 'convert'}")
