"""The inspect and verify command lines: describe one checkpoint, or compare two."""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from ..base.errors import EXIT_MISMATCH
from ..base.memory import read_only_file_mappings
from ..engine.sources import Source, open_checkpoint
from ..run.inspection import as_text, check, describe
from ..run.provenance import as_text as provenance_text
from ..run.provenance import read_record
from ..run.verification import compare_checkpoints
from .cli import add_flag, guarded
from .cli_settings import SettingsParser, parse_settings, print_settings

INSPECT_ENV_PREFIX = "MEGATRON_HF_INSPECT_"  # one prefix per command (see cli.CONVERT_ENV_PREFIX)
VERIFY_ENV_PREFIX = "MEGATRON_HF_VERIFY_"


def _reading_flags(group: argparse._ArgumentGroup) -> None:
    add_flag(group, "iteration", default=None, metavar="N", help="Megatron iteration to read (number or 'release')")
    add_flag(group, "vocab_size", type=int, default=None, metavar="N",
             help="true vocab size when the Megatron args lack it")
    add_flag(group, "hf_config_dir", default=None, metavar="DIR",
             help="MindSpeed-MM rank files, Megatron-LM's own LLaVA rank files: the Hugging Face model directory "
                  "whose config.json describes the model")


def _safety_and_run_groups(parser: SettingsParser) -> None:
    add_flag(parser.add_argument_group("safety"), "trust_checkpoint", action="store_true",
             help="UNSAFE: fully unpickle .pt files (can run code from them); only for files you trust")
    add_flag(parser.add_argument_group("run"), "debug", action="store_true", help="show tracebacks")


def _config_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.hf_config_dir) if args.hf_config_dir else None


def build_inspect_parser() -> SettingsParser:
    parser = SettingsParser(
        description="Describe a Megatron (torch or torch_dist) or Hugging Face checkpoint.",
        usage="%(prog)s PATH [options]", env_prefix=INSPECT_ENV_PREFIX, env_example="TRUST_CHECKPOINT=1",
        examples=("%(prog)s /ckpt/llama-tp2 --check", "%(prog)s /models/llama-hf --json"))
    source = parser.add_argument_group("source")
    source.add_argument("path", help="Megatron tree or iteration directory, or Hugging Face model directory")
    _reading_flags(source)
    report = parser.add_argument_group("report")
    report.add_argument("--json", action="store_true", help="machine-readable output (also of --print_config)")
    report.add_argument("--check", action="store_true",
                        help="read every tensor: replicas equal across TP ranks, no NaN/Inf; exit 3 on problems")
    _safety_and_run_groups(parser)
    return parser


def inspect_main(args: argparse.Namespace) -> int:
    source = open_checkpoint(Path(args.path), args.iteration, args.trust_checkpoint, vocab_size=args.vocab_size,
                             hf_config_dir=_config_dir(args))
    source.check_against_tensors()  # the tensors are laid out by the architecture: refuse one they do not fit
    report = describe(source, args.path)
    record = read_record(source)
    if record is not None:
        report["provenance"] = record
    if args.check:
        report["problems"] = check(source)
    print(json.dumps(report, indent=2) if args.json else as_text(report))
    if record is not None and not args.json:
        print("\n".join(["provenance (conversion.json):", *provenance_text(record)]))
    if args.check and not args.json:
        print("\n".join(f"problem: {p}" for p in report["problems"]) or "check: no problems found")
    return EXIT_MISMATCH if args.check and report["problems"] else 0


def build_verify_parser() -> SettingsParser:
    parser = SettingsParser(
        description="Compare two checkpoints of any formats and layouts, tensor by tensor under their Hugging Face "
                    "names; exit 0 only if equal.",
        usage="%(prog)s A B [options]", env_prefix=VERIFY_ENV_PREFIX, env_example="ATOL=1e-6",
        examples=("%(prog)s /models/llama-hf /ckpt/llama-tp2 --logits",))
    sources = parser.add_argument_group("sources")
    sources.add_argument("a", help="first checkpoint")
    sources.add_argument("b", help="second checkpoint")
    _reading_flags(sources)
    comparison = parser.add_argument_group("comparison")
    add_flag(comparison, "atol", type=float, default=0.0, metavar="X",
             help="largest allowed absolute difference (default 0)")
    comparison.add_argument("--logits", action="store_true",
                            help="also build both Hugging Face models (fp32, in memory) and compare their logits")
    _safety_and_run_groups(parser)
    return parser


def _verify_report(comparison, atol: float) -> list[str]:
    lines = [f"only in A: {name}" for name in comparison.only_in_a]
    lines += [f"only in B: {name}" for name in comparison.only_in_b]
    for name in comparison.differing(atol):
        shapes = comparison.shapes.get(name)
        lines.append(f"differs: {name} " + (f"(shape {shapes[0]} vs {shapes[1]})" if shapes
                                            else f"(max |diff| {comparison.diffs[name]:.3g})"))
    worst = max(comparison.diffs.values(), default=0.0)
    lines.append(f"compared {len(comparison.diffs)} tensors: max |diff| {worst:.3g} (atol {atol:g})")
    if comparison.logits_diff is not None:
        lines.append(f"logits: max |diff| {comparison.logits_diff:.3g}")
    lines.append("EQUAL" if comparison.equal(atol) else "DIFFERENT")
    return lines


def verify_main(args: argparse.Namespace) -> int:
    def open_source(path: str, speculate: ThreadPoolExecutor | None) -> Source:
        return open_checkpoint(Path(path), args.iteration, args.trust_checkpoint, vocab_size=args.vocab_size,
                               speculate=speculate, hf_config_dir=_config_dir(args))
    comparison = compare_checkpoints(open_source, args.a, args.b, args.logits)
    print("\n".join(_verify_report(comparison, args.atol)))
    return 0 if comparison.equal(args.atol) else EXIT_MISMATCH


def _in_mapping_scope(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``main`` with its sources' read-only file mappings registered (see ``memory``) while it runs."""
    def scoped(args: argparse.Namespace) -> int:
        with read_only_file_mappings():
            return main(args)
    return scoped


def _run(parser: SettingsParser, main: Callable[[argparse.Namespace], int], argv: Sequence[str] | None,
         prog: str | None) -> int:
    """Parse the command line over the environment's and the ``--config`` file's settings, then run ``main``."""
    if prog:
        parser.prog = prog
    settings = parse_settings(parser, list(sys.argv[1:] if argv is None else argv))
    if settings.args.print_config:
        return guarded(lambda _: print_settings(parser, settings), settings.args)
    return guarded(_in_mapping_scope(main), settings.args)


def run_inspect_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return _run(build_inspect_parser(), inspect_main, argv, prog)


def run_verify_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return _run(build_verify_parser(), verify_main, argv, prog)
