"""A conversion's settings: read from a file (``--config``), printed (``--print_config``), recorded.

A migration kept in a repository is a YAML or JSON mapping of flag names (either spelling) to values,
as MindSpeed-MM's ``mm-convert`` and Megatron-Bridge's recipes keep theirs. The file's entries become
command-line flags placed before the real ones, so argparse checks them as it checks flags (types,
choices, required flags) and a flag given on the command line wins (the last occurrence does). A
``true`` switch becomes ``--flag``, ``false`` of an on/off flag ``--no-flag``, a list ``a,b,c``,
``null`` leaves the flag unset.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..base.errors import BadInputError

# Flags that say what to do with the settings rather than being settings.
NOT_SETTINGS = ("help", "config", "print_config", "dry_run", "json", "debug", "quiet")
DRY_RUN_ONLY = ("--dry_run", "--dry-run", "--json")  # dropped from the command line a dry run predicts


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of flag values (flag names in either spelling); command-line flags win")
    parser.add_argument("--print_config", "--print-config", dest="print_config", action="store_true",
                        help="print the effective settings (YAML; JSON with --json or a .json --config) and exit")


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long option's name, in the underscore spelling, and its action."""
    return {option[2:].replace("-", "_"): action for action in parser._actions
            for option in action.option_strings if option.startswith("--")}


def read_settings(file: Path) -> dict[str, Any]:
    """A settings file: a JSON object (``.json``) or a YAML mapping (read with ``yaml.safe_load``)."""
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise BadInputError(f"unreadable settings file ({str(error).splitlines()[0]})", file)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BadInputError("settings file must be a mapping of flag names to values", file)
    return values


def _as_flags(action: argparse.Action, key: str, value: Any, file: Path) -> list[str]:
    """The command-line form of one setting."""
    option = action.option_strings[0]
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            raise BadInputError(f"setting '{key}' is an on/off flag: give true or false, not {value!r}", file)
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else "--no-" + option[2:]]
        return [option] if value else []
    if isinstance(value, (dict, bool)):
        raise BadInputError(f"setting '{key}' takes a value, not {value!r}", file)
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return [f"{option}={text}"]


def settings_as_flags(parser: argparse.ArgumentParser, file: Path) -> list[str]:
    """The flags a settings file stands for; an entry that is no setting of this command is bad input."""
    options = _long_options(parser)
    flags = []
    for key, value in read_settings(file).items():
        action = options.get(str(key).replace("-", "_"))
        if action is None or action.dest in NOT_SETTINGS:
            raise BadInputError(f"unknown setting '{key}' (not a flag of {parser.prog})", file)
        flags += _as_flags(action, str(key), value, file)
    return flags


def parse_with_settings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` after the flags of its ``--config`` file; a bad file exits 2 with one line, as a bad flag does."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    config = first.parse_known_args(argv)[0].config
    try:
        from_file = settings_as_flags(parser, Path(config)) if config else []
    except BadInputError as error:
        parser.exit(2, f"error: {error}\n")
    return parser.parse_args([*from_file, *argv])


def effective_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every setting that has a value, in the parser's order: what ``--print_config`` prints and the record keeps."""
    settings = {}
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and action.dest not in NOT_SETTINGS and value is not None and action.dest not in settings:
            settings[action.dest] = value
    return settings


def print_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    settings = effective_settings(parser, args)
    as_json = args.json or (args.config or "").endswith(".json")
    print(json.dumps(settings, indent=2) if as_json else yaml.safe_dump(settings, sort_keys=False), end="\n" * as_json)
    return 0


def invocation(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """What the provenance record keeps of how a conversion was asked for: its command line (without the flags of a
    dry run, so a dry run predicts the record of the real run) and its effective settings."""
    command = [parser.prog, *(arg for arg in argv if arg not in DRY_RUN_ONLY)]
    return {"command": command, "settings": effective_settings(parser, args)}
