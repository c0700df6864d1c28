"""Layer 5, run: the jobs the tool does, from a source to a finished output or report.

Owns a conversion's options, plan and summary (``plan``), its orchestration (``converter``: open, plan,
stream, write, record), output safety (``output``: staging, free space, never into the source), the record
written with every output (``provenance``), the split of one conversion across the processes torchrun
starts (``distributed``, ``shares``), the dry run (``dry_run``), and the inspect and verify jobs
(``inspection``, ``verification``). May import every layer below; never ``commands``.
"""
