"""Command-line plumbing shared by the scripts: flags in both spellings and one-line errors."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence, TextIO

from ..base.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, BadInputError, ProcessesFailed, internal_error_line
from ..base.memory import return_large_allocations_to_the_system
from ..base.runtime import reader_gone, silence_output
from ..formats.fp8_output import HF_QUANTIZATIONS, block_size
from ..formats.megatron_args import DEFAULT_TOKENIZER_TYPE, MEGATRON_TOKENIZER_TYPES
from ..run.converter import convert
from ..run.distributed import follower
from ..run.plan import DEFAULT_TIMEOUT_MINUTES, Options
from ..run.stop_signals import interruption, stopping_on_signals
from .cli_settings import SettingsParser, invocation, parse_settings, print_settings


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--some_flag`` and its ``--some-flag`` spelling as one option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def _layer_list(text: str) -> list[int]:
    """Layer counts, comma-separated (a list in a settings file)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer counts (0 or more)")
    return counts


def _size(text: str) -> int:
    """Whole number >= 1 (a parallel size or multiple)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return value


def _block_size(text: str) -> tuple[int, int]:
    try:
        return block_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _minutes(text: str) -> float:
    """Minutes, a number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of minutes above 0")
    return value


def _source_flags(group: argparse._ArgumentGroup, families: Sequence[str]) -> None:
    add_flag(group, "load_path", required=True, metavar="SRC",
             help="Megatron tree / iteration dir, or HF model dir")
    group.add_argument("--model", choices=list(families), default=None, metavar="FAMILY",
                       help=f"model family: {', '.join(families)} (default: detected from config.json or the Megatron "
                            "args)")
    add_flag(group, "iteration", default=None, metavar="N", help="source iteration to read (number or 'release')")
    add_flag(group, "vocab_size", type=_size, default=None, metavar="N",
             help="true vocab size when the Megatron args do not record it")
    add_flag(group, "drop_mtp_layers", action="store_true",
             help="leave multi-token prediction layers (DeepSeek-V3's) out of the output instead of refusing them")
    add_flag(group, "hf_config_dir", default=None, metavar="DIR",
             help="reading MindSpeed-MM rank files: the Hugging Face model directory whose config.json describes the "
                  "model (they record no architecture); Megatron-LM's own LLaVA rank files: its vision config and "
                  "image token")


def _layout_flags(group: argparse._ArgumentGroup) -> None:
    add_flag(group, "save_path", required=True, metavar="DST", help="output directory (written atomically)")
    group.add_argument("--to", required=True, choices=["hf", "megatron"], help="output format")
    add_flag(group, "target_tensor_model_parallel_size", type=_size, default=None, metavar="N",
             help="target TP size (default: the source's for Megatron sources, else 1)")
    add_flag(group, "target_pipeline_model_parallel_size", type=_size, default=None, metavar="N",
             help="target PP size (default: the source's for Megatron sources, else 1)")
    add_flag(group, "target_pipeline_layers", type=_layer_list, default=None, metavar="L1,L2,..",
             help="uneven pipeline stages, e.g. 3,3,2 (must sum to num_layers); with a virtual pipeline, "
                  "all PP x VPP stages in model order")
    add_flag(group, "vision_pipeline_layers", type=_layer_list, default=None, metavar="L1,L2,..",
             help="MindSpeed-MM output: the vision tower's layers per pipeline rank, e.g. 32,0,0,0 beside "
                  "--target_pipeline_layers 1,10,10,7 (default: the source's, else all on the first rank)")
    add_flag(group, "target_virtual_pipeline_model_parallel_size", type=_size, default=None, metavar="N",
             help="model chunks per pipeline rank (interleaved schedule: rank files hold model0, model1, ...); "
                  "default: the source's when the pipeline is kept, else 1")
    add_flag(group, "target_expert_model_parallel_size", type=_size, default=None, metavar="N",
             help="target EP size for mixture-of-experts models (default: the source's, else 1)")
    add_flag(group, "target_data_parallel_size", type=_size, default=1, metavar="N",
             help="DP size for the dummy distributed-optimizer files (default 1)")
    add_flag(group, "target_params_dtype", choices=["fp32", "fp16", "bf16"], default=None,
             help="output dtype (default: keep the source dtype)")
    add_flag(group, "max_position_embeddings", type=_size, default=None, metavar="N",
             help="context length recorded in args / config.json (default: the source's; learned position "
                  "embeddings keep theirs)")


def _megatron_flags(group: argparse._ArgumentGroup) -> None:
    add_flag(group, "megatron_format", choices=["mcore", "legacy", "mindspeed_mm"], default=None,
             help="Megatron key schema (default: the source's for Megatron sources, else mcore)")
    add_flag(group, "megatron_ckpt_format", choices=["torch", "torch_dist"], default=None,
             help="Megatron file format: mp_rank_* rank files, or torch_dist (default: the source's for Megatron "
                  "sources, else torch)")
    group.add_argument("--megatron_bridge", "--megatron-bridge", dest="megatron_bridge",
                       action=argparse.BooleanOptionalAction, default=None,
                       help="torch_dist as NVIDIA Megatron-Bridge saves it (iter_0000000, run_config.yaml, train "
                            "state, tokenizer); implies torch_dist (default: when the source is one)")
    add_flag(group, "transformer_impl", choices=["transformer_engine", "local"], default=None,
             help="mcore norm naming (default: the source's for Megatron sources, else transformer_engine)")
    add_flag(group, "moe_grouped_gemm", action="store_true",
             help="write experts in the TEGroupedMLP form (mlp.experts.linear_fc1.weightJ)")
    add_flag(group, "use_distributed_optimizer", action="store_true",
             help="write model_rng.pt plus dummy mp_rank_*_DDD/optim.pt files")
    add_flag(group, "zip_crc32", action="store_true",
             help="checksum every record of Megatron rank files (slower; torch.load never checks them, zip tools do)")
    add_flag(group, "make_vocab_size_divisible_by", type=_size, default=128, metavar="N",
             help="Megatron vocab padding multiple (default 128, times TP)")
    add_flag(group, "tokenizer_type", choices=MEGATRON_TOKENIZER_TYPES, default=None, metavar="TYPE",
             help="Megatron-LM's --tokenizer-type recorded in args (default: HuggingFaceTokenizer for HF sources "
                  f"or with --tokenizer_name, else the source's, else {DEFAULT_TOKENIZER_TYPE})")
    add_flag(group, "seq_length", type=_size, default=None, metavar="N",
             help="training sequence length recorded in args (default: the source's, else max_position_embeddings)")


def _hf_flags(group: argparse._ArgumentGroup) -> None:
    add_flag(group, "max_shard_size", default="10GB", metavar="SIZE", help="largest HF shard (default 10GB)")
    group.add_argument("--safe_serialization", "--safe-serialization", dest="safe_serialization",
                       action=argparse.BooleanOptionalAction, default=True,
                       help="write safetensors (default) or, with --no-safe_serialization, pytorch .bin")
    add_flag(group, "tokenizer_name", default=None, metavar="DIR",
             help="HF output: local directory whose tokenizer files are copied; Megatron output: recorded as "
                  "tokenizer_model (a local path, made absolute, or a hub name)")
    add_flag(group, "hf_quantization", choices=list(HF_QUANTIZATIONS), default=None,
             help="fp8_block writes the weights transformers' fine-grained FP8 loader reads as float8_e4m3fn with a "
                  "weight_scale_inv per block, as DeepSeek-V3 and Qwen3-FP8 ship them")
    add_flag(group, "fp8_block_size", type=_block_size, default=None, metavar="R,C",
             help="--hf_quantization fp8_block: the blocks (default: an FP8 source's, else 128,128)")


def _safety_flags(group: argparse._ArgumentGroup) -> None:
    add_flag(group, "dry_run", action="store_true",
             help="check everything and print the plan (files and sizes, memory, disk, Megatron args, warnings); "
                  "writes nothing")
    add_flag(group, "overwrite", action="store_true", help="replace a non-empty save path")
    add_flag(group, "trust_checkpoint", action="store_true",
             help="UNSAFE: fully unpickle .pt files (can run code from them); only for files you trust")
    group.add_argument("--hash", action="store_true",
                       help="record every source file's SHA-256 in the output's conversion.json (reads the source "
                            "once more)")


def add_run_flags(group: argparse._ArgumentGroup) -> None:
    """Flags of how any command runs and reports."""
    add_flag(group, "quiet", action="store_true", help="no progress bars")
    add_flag(group, "debug", action="store_true", help="show tracebacks")


def _scale_out_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--json", action="store_true", help="--dry_run and --print_config: machine-readable output")
    add_flag(group, "distributed_timeout", type=_minutes, default=DEFAULT_TIMEOUT_MINUTES, metavar="MIN",
             help="under torchrun: fail when no process has written anything for this many minutes while one waits "
                  f"for the others (default {DEFAULT_TIMEOUT_MINUTES:g}); a process that dies is noticed at once")


def guarded(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``main``: bad input -> one line and exit 2; a bug -> one line and exit 1; --debug re-raises.

    Warnings are held back and printed, one line each, when the command ends, except when it ends on bad
    input or a signal: then the error is the only line (a warning about a run that never happened is noise).
    """
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return_large_allocations_to_the_system()
    # one of several processes (torchrun): the leader speaks for all of them
    voice = silence_output() if follower() and not args.debug else sys.stderr
    with warnings.catch_warnings(record=True) as held, stopping_on_signals():  # SIGTERM, SIGHUP as Ctrl-C
        code = _run(main, args, voice)
    if code != EXIT_BAD_INPUT and code < 128:  # 128 + N: ended by signal N
        for warning in held:
            print(f"warning: {warning.message}", file=sys.stderr)
    return code


def _run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace, voice: TextIO) -> int:
    try:
        code = main(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
        return code
    except BadInputError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ProcessesFailed as failure:  # one of several processes (torchrun) failed; every one exits so
        if args.debug and failure.cause is not None:
            raise failure.cause
        if failure.speaks:
            print(failure.line, file=voice, flush=True)
        return failure.code
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM or SIGHUP
        line, code = interruption(stop)
        print(line, file=sys.stderr)
        return code
    except BrokenPipeError:
        return reader_gone()
    except Exception as error:  # an internal error: short message, traceback only on request
        if args.debug:
            raise
        print(internal_error_line(error), file=sys.stderr)
        return EXIT_INTERNAL


def options_from_args(args: argparse.Namespace, **overrides) -> Options:
    fields = dict(
        load_path=Path(args.load_path), save_path=Path(args.save_path), to=getattr(args, "to", None),
        model=getattr(args, "model", None),
        tensor_parallel=args.target_tensor_model_parallel_size,
        pipeline_parallel=args.target_pipeline_model_parallel_size,
        pipeline_layers=args.target_pipeline_layers, data_parallel=args.target_data_parallel_size,
        virtual_pipeline=getattr(args, "target_virtual_pipeline_model_parallel_size", None),
        expert_parallel=getattr(args, "target_expert_model_parallel_size", None),
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", False),
        use_distributed_optimizer=args.use_distributed_optimizer, params_dtype=args.target_params_dtype,
        zip_crc32=getattr(args, "zip_crc32", False),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        megatron_format=getattr(args, "megatron_format", None),
        megatron_ckpt_format=getattr(args, "megatron_ckpt_format", None),
        megatron_bridge=getattr(args, "megatron_bridge", None),
        transformer_impl=getattr(args, "transformer_impl", None), max_shard_size=args.max_shard_size,
        safe_serialization=args.safe_serialization, tokenizer_name=args.tokenizer_name,
        tokenizer_type=getattr(args, "tokenizer_type", None), seq_length=getattr(args, "seq_length", None),
        max_position_embeddings=getattr(args, "max_position_embeddings", None),
        iteration=getattr(args, "iteration", None), vocab_size=getattr(args, "vocab_size", None),
        trust_checkpoint=args.trust_checkpoint, overwrite=getattr(args, "overwrite", False), quiet=args.quiet,
        drop_mtp_layers=getattr(args, "drop_mtp_layers", False),
        hash_source=getattr(args, "hash", False), invocation=getattr(args, "invocation", None),
        distributed_timeout=getattr(args, "distributed_timeout", DEFAULT_TIMEOUT_MINUTES),
        hf_quantization=getattr(args, "hf_quantization", None), fp8_block_size=getattr(args, "fp8_block_size", None),
        vision_pipeline_layers=getattr(args, "vision_pipeline_layers", None),
        hf_config_dir=Path(args.hf_config_dir) if getattr(args, "hf_config_dir", None) else None,
    )
    fields.update(overrides)
    return Options(**fields)


def convert_main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    summary = convert(options)
    if not options.quiet:
        print(summary.line(options.save_path))
    return 0


def dry_run_main(args: argparse.Namespace) -> int:
    """Print the plan; exit 2 when the conversion would be refused (e.g. too little free disk)."""
    from ..run.dry_run import as_text, plan_report  # its report code is only needed by a dry run
    report = plan_report(options_from_args(args))
    print(json.dumps(report, indent=2) if args.json else as_text(report))
    for problem in report["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_BAD_INPUT if report["problems"] else 0


CONVERT_ENV_PREFIX = "MEGATRON_HF_CONVERT_"  # the console command's name: a variable set for one command leaves the
# others alone (inspect and verify share flag names, such as --json and --iteration, that mean other things there)
CONVERT_EXAMPLES = (
    "Hugging Face -> Megatron, TP 2:",
    "  %(prog)s --load_path /hf/llama --save_path /ckpt/llama-tp2 --to megatron \\",
    "      --target_tensor_model_parallel_size 2",
    "Megatron -> Hugging Face:",
    "  %(prog)s --load_path /ckpt/llama-tp2 --save_path /hf/llama-back --to hf",
    "from a settings file (fill in its REQUIRED keys first):",
    "  %(prog)s --print_config > c.yaml",
    "  %(prog)s --config c.yaml",
)


def build_convert_parser(families: Sequence[str]) -> SettingsParser:
    """The conversion's flags, in groups; each is a setting of files and the environment (see ``cli_settings``)."""
    parser = SettingsParser(
        description="Convert or reshape checkpoints between Megatron-LM and Hugging Face transformers.",
        usage="%(prog)s --load_path SRC --save_path DST --to {hf,megatron} [options]",
        env_prefix=CONVERT_ENV_PREFIX, env_example="TARGET_TENSOR_MODEL_PARALLEL_SIZE=2", examples=CONVERT_EXAMPLES)
    _source_flags(parser.add_argument_group("source"), families)
    _layout_flags(parser.add_argument_group("target layout"))
    _megatron_flags(parser.add_argument_group("Megatron output"))
    _hf_flags(parser.add_argument_group("Hugging Face output"))
    _safety_flags(parser.add_argument_group("safety"))
    run = parser.add_argument_group("run and scale-out")
    add_run_flags(run)
    _scale_out_flags(run)
    return parser


def run_convert_cli(argv: Sequence[str] | None, families: Sequence[str], prog: str | None = None) -> int:
    parser = build_convert_parser(families)
    if prog:
        parser.prog = prog
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(parser, argv)
    args = settings.args
    if args.print_config:
        return guarded(lambda _: print_settings(parser, settings), args)
    args.invocation = invocation(parser, settings, argv)
    return guarded(dry_run_main if args.dry_run else convert_main, args)
