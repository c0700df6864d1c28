#!/usr/bin/env python
"""Build a tiny random GPT-2 checkpoint: Hugging Face, or Megatron at a chosen layout, version and schema.

The Megatron tree is written by an independent writer that lays tensors out the way Megatron-LM does
(including the QKV orders of checkpoint versions 0 and 1.0), not by the converter itself.
"""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from checkpoint_convert.commands.cli import add_flag, guarded
from checkpoint_convert.base.errors import BadInputError
from checkpoint_convert.base.runtime import exit_now
from megatron_gpt2.reference_writer import reference_megatron_gpt2, tiny_gpt2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_flag(parser, "out", required=True, help="directory to create")
    parser.add_argument("--format", choices=["hf", "megatron"], default="hf")
    add_flag(parser, "tensor_parallel", type=int, default=1)
    add_flag(parser, "pipeline_parallel", type=int, default=1)
    add_flag(parser, "checkpoint_version", type=float, default=3.0, help="0, 1.0, 2.0 or 3.0 (QKV order)")
    add_flag(parser, "schema", choices=["legacy", "local", "transformer_engine"], default="legacy")
    add_flag(parser, "vocab_size", type=int, default=1000)
    add_flag(parser, "untied", action="store_true", help="separate output layer")
    parser.add_argument("--seed", type=int, default=0)
    add_flag(parser, "debug", action="store_true", help="show tracebacks")
    return parser


def make_tiny(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BadInputError("exists and is not empty", out)
    if args.format == "hf":
        tiny_gpt2(out, tied=not args.untied, vocab=args.vocab_size, seed=args.seed)
    else:
        model = tiny_gpt2(None, tied=not args.untied, vocab=args.vocab_size, seed=args.seed)
        reference_megatron_gpt2(model, out, tp=args.tensor_parallel, pp=args.pipeline_parallel,
                                version=args.checkpoint_version, schema=args.schema)
    print(f"wrote a tiny GPT-2 ({args.format}) to {out}")
    return 0


def main(argv=None) -> int:
    """Bad input: one line, exit 2; a reader of stdout that went away: exit 141 quietly (as every command here)."""
    return guarded(make_tiny, build_parser().parse_args(argv))


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
