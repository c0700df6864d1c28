#!/usr/bin/env python
"""Drop-in replacement for transformers' ``checkpoint_reshaping_and_interoperability.py`` (GPT-2).

Same arguments as the original script. Differences: Megatron-LM need not be installed
(``--megatron-path`` is accepted and ignored), Hugging Face inputs may be safetensors or .bin, the
Hugging Face output is safetensors, and the conversion streams instead of loading the whole model.
Megatron output is the legacy (``language_model.*``) schema the original wrote.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_gpt2  # noqa: E402,F401  (registers gpt2)
from checkpoint_convert.commands.cli import add_flag, guarded, options_from_args  # noqa: E402
from checkpoint_convert.run.converter import convert  # noqa: E402
from checkpoint_convert.engine.sources import open_checkpoint  # noqa: E402
from checkpoint_convert.run.inspection import as_text, describe  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_flag(parser, "load_path", required=True, help="Path to the checkpoint to convert.")
    add_flag(parser, "save_path", required=True, help="Path to the converted checkpoint.")
    parser.add_argument("--convert_checkpoint_from_megatron_to_transformers", action="store_true",
                        help="Megatron -> Transformers; without it, Transformers -> Megatron.")
    parser.add_argument("--print-checkpoint-structure", "--print_checkpoint_structure",
                        dest="print_checkpoint_structure", action="store_true")
    add_flag(parser, "megatron_path", default=None, help="Accepted for compatibility; not needed.")
    add_flag(parser, "target_tensor_model_parallel_size", type=int, default=1)
    add_flag(parser, "target_pipeline_model_parallel_size", type=int, default=1)
    add_flag(parser, "target_data_parallel_size", type=int, default=1)
    add_flag(parser, "target_params_dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    add_flag(parser, "make_vocab_size_divisible_by", type=int, default=128)
    add_flag(parser, "use_distributed_optimizer", action="store_true")
    add_flag(parser, "tokenizer_name", default=None, help="Local directory holding the tokenizer files.")
    add_flag(parser, "max_shard_size", default="10GB")
    parser.add_argument("--safe_serialization", action=argparse.BooleanOptionalAction, default=True)
    add_flag(parser, "trust_checkpoint", action="store_true", help="UNSAFE: fully unpickle .pt files")
    add_flag(parser, "debug", action="store_true")
    add_flag(parser, "quiet", action="store_true")
    add_flag(parser, "overwrite", action="store_true")
    parser.set_defaults(target_pipeline_layers=None)
    return parser


def main(args: argparse.Namespace) -> int:
    to_hf = args.convert_checkpoint_from_megatron_to_transformers
    options = options_from_args(args, to="hf" if to_hf else "megatron", model="gpt2",
                                megatron_format=None if to_hf else "legacy")
    summary = convert(options)
    if args.print_checkpoint_structure:  # the converted checkpoint, as scripts/inspect_checkpoint.py prints it
        print(as_text(describe(open_checkpoint(options.save_path, model="gpt2"), str(options.save_path))))
    if not options.quiet:
        print(summary.line(options.save_path))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, build_parser().parse_args()))
