"""Layer 6, commands: the command lines.

Owns argument parsing and one-line errors (``cli``), settings files (``cli_settings``), the inspect and verify
command lines (``report_cli``) and the console entry points that find the family packages (``entry``).
May import every layer below; nothing in the package imports it but ``__main__``.
"""
