"""A command's settings: its flags, also read from a file (``--config``) and the environment, printed
(``--print_config``) and recorded.

Every optional flag of a command is a setting, found in its parser (so a flag added with ``add_argument``
is one with no further edit): a key of a YAML or JSON settings file (flag names in either spelling, as
MindSpeed-MM's ``mm-convert`` and Megatron-Bridge's recipes keep theirs) and an environment variable (the
command's prefix plus the flag's name in capitals). Only ``--help``, ``--config`` and ``--print_config``,
which say what to do with the settings, are not settings. Precedence: command line > environment > file >
defaults. Values from a file or the environment become the parser's defaults (``set_defaults``), checked
first with the flag's own type function and choices so a bad one is named where it came from; argparse
then parses the command line over them. A ``true`` switch is on, ``false`` off, a list is written
``a,b,c`` in the environment, ``null`` (or an empty variable) leaves a setting unset.
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import yaml

from ..base.errors import BadInputError

# The flags that are not settings, and why (one line each, for the message refusing them as settings).
NOT_SETTINGS = {
    "help": "it prints the help and exits",
    "config": "it names the settings file itself",
    "print_config": "it prints the settings instead of running",
}
PLAN_ONLY = ("dry_run", "json")  # left out of the record: a dry run predicts the real run's record to the byte
DRY_RUN_ONLY = ("--dry_run", "--dry-run", "--json")  # likewise dropped from the recorded command line
COMMAND_LINE, DEFAULT = "command line", "default"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that names each flag once (``--some_flag N``; ``--some-flag`` works too) and keeps the epilog's lines."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        name = next(option for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"--[no-]{name[2:]}"
        if action.nargs == 0:
            return ", ".join([option for option in action.option_strings if not option.startswith("--")] + [name])
        return f"{name} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class SettingsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose flags are settings: ``env_prefix`` names their variables; ``examples`` (lines)
    and the precedence rule end the help."""

    def __init__(self, *, env_prefix: str, examples: Sequence[str], env_example: str, **kwargs: Any) -> None:
        rule = (f"settings: every flag can also be set in a --config file (start from --print_config > c.yaml) or "
                f"in an environment variable {env_prefix}<FLAG> (e.g. {env_prefix}{env_example}); the command "
                "line wins over the environment, which wins over the file, which wins over the defaults.")
        epilog = "\n".join(["examples:", *(f"  {line}" for line in examples), "", *textwrap.wrap(rule, 100)])
        description = kwargs.pop("description", None)
        super().__init__(formatter_class=HelpFormatter, epilog=epilog,
                         description=description and textwrap.fill(description, 100), **kwargs)
        self.env_prefix = env_prefix
        self.add_argument("--config", default=None, metavar="FILE",
                          help="YAML or JSON file of settings (print a template with --print_config)")
        self.add_argument("--print_config", "--print-config", dest="print_config", action="store_true",
                          help="print every setting with its effective value as a commented YAML template (JSON "
                               "with --json or a .json --config) and exit")

    def error(self, message: str) -> NoReturn:
        """argparse's one-line error; a missing flag's also says where else it can be set."""
        if message.startswith("the following arguments are required") and "--" in message:
            message += f" (on the command line, as {self.env_prefix}<FLAG>, or in a --config file)"
        super().error(message)


@dataclass
class Settings:
    """A parsed command line with where each setting came from, and the parser's own defaults and required flags."""
    args: argparse.Namespace
    sources: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    required: set[str] = field(default_factory=set)


def setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every setting (optional flag but those of ``NOT_SETTINGS``) by its name, in the parser's order."""
    return {action.dest: action for action in parser._actions
            if action.option_strings and action.dest not in NOT_SETTINGS}


def _names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every long spelling of a flag, as a settings key (underscores), and the name of the flag it spells."""
    names = {}
    for action in parser._actions:
        negative = "--no-" if isinstance(action, argparse.BooleanOptionalAction) else None
        for option in action.option_strings:
            if option.startswith("--") and not (negative and option.startswith(negative)):
                names[option[2:].replace("-", "_")] = action.dest
    return names


def _not_a_setting(parser: argparse.ArgumentParser, key: str, name: str | None) -> str:
    """Why ``key`` cannot be set: a flag that says what to do with the settings, or no flag of the command."""
    if name in NOT_SETTINGS:
        return f"--{name} cannot be a setting: {NOT_SETTINGS[name]} (give it on the command line)"
    positional = [action.dest for action in parser._actions if not action.option_strings]
    if key in positional:
        return f"'{key}' is the command's positional argument, not a flag: give it on the command line"
    negated = _names(parser).get(key[len("no_"):]) if key.startswith("no_") else None
    if negated in setting_actions(parser):
        return f"'{key}' is the off spelling of --{negated}: set '{negated}' to false"
    return f"unknown setting '{key}': no flag of {parser.prog} is named --{key} (see --print_config)"


def _switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0


def _switch_value(action: argparse.Action, on: bool) -> Any:
    """What a switch's setting stores: on/off for ``--[no-]flag``; the flag's constant when on, else its default."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return on
    return action.const if on else action.default


def _checked(action: argparse.Action, text: str) -> Any:
    """``text`` read as the flag reads a value on the command line: its type function, then its choices."""
    try:
        value = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"has a bad value: {error}")
    except (TypeError, ValueError):
        raise ValueError(f"has a bad value: {text!r} is no {_describe_kind(action)}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"has a bad value: {text!r} is not {_describe_kind(action)}")
    return value


def _from_file(action: argparse.Action, value: Any) -> Any:
    """A settings file's value (YAML/JSON data) for one flag; ValueError says what is wrong with it."""
    if _switch(action):
        if not isinstance(value, bool):
            raise ValueError(f"is an on/off flag: give true or false, not {value!r}")
        return _switch_value(action, value)
    if isinstance(value, (dict, bool)):
        raise ValueError(f"takes a value, not {value!r}")
    return _checked(action, ",".join(map(str, value)) if isinstance(value, list) else str(value))


def _from_environment(action: argparse.Action, text: str) -> Any:
    """An environment variable's text for one flag; ValueError says what is wrong with it."""
    if _switch(action):
        if text.lower() not in _ON + _OFF:
            raise ValueError(f"is an on/off flag: give one of {', '.join(_ON + _OFF)}, not {text!r}")
        return _switch_value(action, text.lower() in _ON)
    return _checked(action, text)


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


def file_layer(parser: argparse.ArgumentParser, file: Path) -> dict[str, tuple[Any, str]]:
    """The settings a file sets (name -> value and where it came from); a bad entry is bad input naming the file."""
    names, actions, origin = _names(parser), setting_actions(parser), f"config file {file.resolve()}"
    layer = {}
    for key, value in read_settings(file).items():
        key = str(key).replace("-", "_")
        name = names.get(key)
        if name not in actions:
            raise BadInputError(_not_a_setting(parser, key, name), file)
        try:
            if value is not None:
                layer[name] = (_from_file(actions[name], value), origin)
        except ValueError as error:
            raise BadInputError(f"setting '{key}' {error}", file)
    return layer


def environment_layer(parser: SettingsParser, environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """The settings the environment sets; a variable with the command's prefix that sets none, or holds a bad value,
    is bad input naming the variable."""
    names, actions = _names(parser), setting_actions(parser)
    layer = {}
    for variable in sorted(environ):
        if not variable.startswith(parser.env_prefix) or not environ[variable]:
            continue
        key = variable[len(parser.env_prefix):].lower()
        name = names.get(key)
        if name not in actions:
            raise BadInputError(f"{variable}: {_not_a_setting(parser, key, name)}")
        try:
            layer[name] = (_from_environment(actions[name], environ[variable]), f"environment {variable}")
        except ValueError as error:
            raise BadInputError(f"{variable} {error}")
    return layer


def _given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The settings ``argv`` sets: what argparse writes into a namespace whose every entry is a marker."""
    marker = object()
    namespace = argparse.Namespace(**{name: marker for name in setting_actions(parser)})
    parser.parse_known_args(argv, namespace)
    return {name for name, value in vars(namespace).items() if value is not marker}


def parse_settings(parser: SettingsParser, argv: Sequence[str],
                   environ: Mapping[str, str] | None = None) -> Settings:
    """Parse ``argv`` over the environment's settings over the ``--config`` file's; a bad file or variable exits 2
    with one line, as a bad flag does. With ``--print_config``, no flag is required (the template marks them)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    first.add_argument("--print_config", "--print-config", action="store_true")
    early = first.parse_known_args(argv)[0]
    actions = setting_actions(parser)
    settings = Settings(argparse.Namespace(), defaults={name: action.default for name, action in actions.items()},
                        required={name for name, action in actions.items() if action.required})
    try:
        layers = file_layer(parser, Path(early.config)) if early.config else {}
        layers.update(environment_layer(parser, os.environ if environ is None else environ))
    except BadInputError as error:
        parser.exit(2, f"error: {error}\n")
    parser.set_defaults(**{name: value for name, (value, _) in layers.items()})
    for name, action in actions.items():
        action.required = action.required and name not in layers and not early.print_config
    if early.print_config:  # a template needs no checkpoint: the positional arguments may be left out too
        for action in parser._actions:
            if not action.option_strings:
                action.nargs, action.required, action.default = "?", False, None
    settings.args = parser.parse_args(argv)
    given = _given_on_command_line(parser, argv)
    settings.sources = {name: COMMAND_LINE if name in given else layers[name][1] if name in layers else DEFAULT
                        for name in actions}
    return settings


def effective_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Every setting that has a value, in the parser's order: ``--print_config --json`` prints it."""
    values = {name: getattr(args, name, None) for name in setting_actions(parser)}
    return {name: value for name, value in values.items() if value is not None}


def _describe_kind(action: argparse.Action) -> str:
    """What a setting takes, from its flag: on/off, its choices, or its type (a type function's docstring)."""
    if _switch(action):
        return "true or false"
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    builtin = {None: "text", str: "text", int: "integer", float: "number"}
    if action.type in builtin:
        return builtin[action.type]
    doc = (getattr(action.type, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else getattr(action.type, "__name__", "value")


def _yaml_value(value: Any) -> str:
    """A value as YAML on one line (a list as ``[3, 3, 2]``)."""
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True, width=10_000).strip()
    return yaml.safe_dump({"k": value}, width=10_000)[len("k: "):].strip()


def _entry(parser: argparse.ArgumentParser, action: argparse.Action, settings: Settings) -> list[str]:
    """One setting of the template: its help and what it takes as comments, then ``name: value``."""
    name = action.dest
    help_text = "" if action.help in (None, argparse.SUPPRESS) else action.help % dict(vars(action), prog=parser.prog)
    facts = [_describe_kind(action), "REQUIRED" if name in settings.required
             else f"default: {_yaml_value(settings.defaults[name])}"]
    source = settings.sources.get(name, DEFAULT)
    if source != DEFAULT:
        facts.append(f"now from the {source}")
    comments = textwrap.wrap(help_text, 98) + ["; ".join(facts)]
    return [*(f"# {line}" for line in comments), f"{name}: {_yaml_value(getattr(settings.args, name, None))}"]


def template(parser: SettingsParser, settings: Settings) -> str:
    """Every setting, group by group, as a commented YAML file that ``--config`` reads back."""
    lines = [f"# Settings of {parser.prog}; run it with --config FILE. Keys are its flags; null leaves one unset.",
             f"# Precedence: command line > environment ({parser.env_prefix}<KEY in capitals>) > this file > defaults."]
    actions = setting_actions(parser)
    for group in parser._action_groups:
        entries = [action for action in group._group_actions if action.dest in actions]
        if entries:
            lines += ["", f"# ===== {group.title} ====="]
        for action in entries:
            lines += ["", *_entry(parser, action, settings)]
    return "\n".join(lines) + "\n"


def print_settings(parser: SettingsParser, settings: Settings) -> int:
    """``--print_config``: the commented template with the effective values, or (``--json``, a ``.json`` config) the
    machine-readable mapping of every setting that has a value."""
    args = settings.args
    if getattr(args, "json", False) or (args.config or "").endswith(".json"):
        print(json.dumps(effective_settings(parser, args), indent=2))
    else:
        print(template(parser, settings), end="")
    return 0


def invocation(parser: argparse.ArgumentParser, settings: Settings, argv: Sequence[str]) -> dict[str, Any]:
    """What the provenance record keeps of how a conversion was asked for: its command line and its effective settings
    with where each came from (without the flags of a dry run, so a dry run predicts the record of the real run)."""
    command = [parser.prog, *(arg for arg in argv if arg not in DRY_RUN_ONLY)]
    values = {name: value for name, value in effective_settings(parser, settings.args).items() if name not in PLAN_ONLY}
    return {"command": command, "settings": values, "sources": {name: settings.sources[name] for name in values}}
