"""Layer 1, base: what every other layer leans on and that knows nothing of checkpoints.

Owns user-facing errors and exit codes (``errors``), process start-up and exit costs (``runtime``), bounded
memory while reading memory-mapped files (``memory``) and the tool's installed distribution
(``distribution``). Imports nothing from the rest of the package.
"""
