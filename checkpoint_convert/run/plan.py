"""What one conversion is: its options, its plan, each process's share of it, and its summary.

These are the data every job of the run layer passes around (``converter`` makes them, ``distributed`` and
``shares`` divide them among processes, ``provenance`` and ``dry_run`` describe them); they live here, below
all of those, so that none of them needs another's module to name them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Protocol

import torch

from ..engine.sources import Source
from ..formats import megatron_schema as schema
from ..formats.bridge_config import run_config_for, write_bridge_files
from ..formats.hf_io import HFWriter, tensor_nbytes
from ..formats.megatron_args import ParallelLayout
from ..formats.megatron_io import MegatronWriter
from ..formats.mindspeed_mm import MINDSPEED_MM, MindSpeedWriter
from ..formats.sinks import DiskSink
from ..model.arch import ModelArch

DEFAULT_TIMEOUT_MINUTES = 10.0  # under torchrun: minutes without progress before a conversion fails


class Processes(Protocol):
    """The processes converting together (``distributed.Solo`` or ``distributed.Team``), as a share sees them."""

    def all_written(self, part: Any) -> list[Any] | None: ...


@dataclass
class Options:
    """Everything a conversion needs; the CLIs fill it from their flags."""

    load_path: Path
    save_path: Path
    to: str  # "hf" or "megatron"
    model: str | None = None
    tensor_parallel: int | None = None
    pipeline_parallel: int | None = None
    pipeline_layers: list[int] | None = None
    virtual_pipeline: int | None = None  # model chunks per pipeline rank
    expert_parallel: int | None = None
    moe_grouped_gemm: bool = False
    data_parallel: int = 1
    use_distributed_optimizer: bool = False
    zip_crc32: bool = False  # checksum rank-file records (torch.load never checks them)
    params_dtype: str | None = None
    make_vocab_size_divisible_by: int = 128
    megatron_format: str | None = None  # "mcore" or "legacy"; None keeps a Megatron source's
    megatron_ckpt_format: str | None = None  # "torch" or "torch_dist"; None keeps a Megatron source's
    megatron_bridge: bool | None = None  # torch_dist as Megatron-Bridge saves it; None keeps a Megatron source's
    transformer_impl: str | None = None  # "transformer_engine" or "local"
    max_shard_size: str = "10GB"
    safe_serialization: bool = True
    tokenizer_name: str | None = None
    tokenizer_type: str | None = None  # Megatron output: Megatron-LM's tokenizer type
    seq_length: int | None = None  # Megatron output: training sequence length recorded in args
    max_position_embeddings: int | None = None
    iteration: str | None = None
    vocab_size: int | None = None
    trust_checkpoint: bool = False
    overwrite: bool = False
    quiet: bool = False
    drop_mtp_layers: bool = False  # leave multi-token prediction layers out instead of refusing the source
    hash_source: bool = False  # provenance: SHA-256 of every source file (reads each once more)
    invocation: dict[str, Any] | None = None  # provenance: the command line and effective settings
    distributed_timeout: float = DEFAULT_TIMEOUT_MINUTES  # under torchrun: minutes without progress before failing
    hf_quantization: str | None = None  # Hugging Face output: "fp8_block" writes FP8 weights with block scales
    fp8_block_size: tuple[int, int] | None = None  # their blocks (the FP8 source's, else 128 x 128)
    # ---- MindSpeed-MM's layout (``--megatron_format mindspeed_mm``)
    vision_pipeline_layers: list[int] | None = None  # the vision tower's layers per pipeline rank
    hf_config_dir: Path | None = None  # reading MindSpeed-MM rank files: the Hugging Face config they lack


@dataclass
class Summary:
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    planned: list = field(default_factory=list)  # (key, shape, dtype) of every output tensor
    split: str = ""  # under torchrun: how the processes shared the work

    def line(self, save_path: Path) -> str:
        split = f"; {self.split}" if self.split else ""
        return (f"wrote {self.tensors} tensors, {self.bytes_written / 1e9:.3f} GB in {self.seconds:.1f} s "
                f"(peak RSS {self.peak_rss_mb:.0f} MB) to {save_path}{split}")


@dataclass
class Share:
    """What one process converts: the planned outputs it writes (``by_item``), the items it reads, its files."""

    team: Processes
    by_item: list
    items: list
    files: frozenset[Hashable] | None = None  # None: every file
    keys: frozenset[Hashable] | None = None  # the outputs' keys; None: every output
    process: int = 0

    @property
    def writes_objects(self) -> bool:
        """Whether this process writes what one process writes beside the tensors (``torch_dist``'s objects)."""
        return self.process == 0

    def all_written(self, part: Any) -> list[Any] | None:
        """Every process's ``part`` once all tensor files are written, for the leader; None for the others."""
        return self.team.all_written(part)



@dataclass
class Plan:
    """Everything a conversion will write, decided on ``meta`` tensors before any tensor is read.

    A conversion streams the source through ``writer``; a dry run (``dry_run``) hands the same writer
    ``meta`` tensors and a sizing sink, so both go through :func:`write_output`.
    """

    options: Options
    source: Source
    dtype: torch.dtype | None
    items: list
    target: Any
    by_item: list  # (item, key, shape, dtype) of every output tensor, in production order
    out_arch: ModelArch  # the output's architecture (context length and dtype as written)
    layout: ParallelLayout | None = None  # Megatron output
    ckpt_format: str | None = None  # Megatron output: "torch" or "torch_dist"
    target_schema: str | None = None  # Megatron output
    bridge: bool = False  # Megatron output saved as Megatron-Bridge does
    args: Any = None  # Megatron output: the args written
    quantized: Any = None  # FP8 Hugging Face output: its ``fp8_output.FP8Layout``
    unquantized: list | None = None  # FP8 Hugging Face output: (key, shape, dtype) of the tensors before quantizing

    @property
    def to_hf(self) -> bool:
        return self.layout is None

    @property
    def planned(self) -> list:
        return [entry[1:] for entry in self.by_item]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.planned)

    @property
    def output_dtype(self) -> torch.dtype:
        return output_dtype_of(self.planned, self.dtype)

    def writer(self, root: Path, sink: DiskSink, share: Share | None = None) -> Any:
        """The writer of the output's tensor files (and, for Megatron, of everything but the provenance record);
        with a ``share``, of that process's tensor files."""
        options, files = self.options, share.files if share else None
        if self.to_hf:
            return HFWriter(root, self.planned, options.max_shard_size, options.safe_serialization, sink, files)
        if self.ckpt_format == "torch_dist":
            return torch_dist_writer(root, self, sink, share)
        if self.target_schema == MINDSPEED_MM:
            return MindSpeedWriter(root, self.planned, self.layout.tp, self.layout.pp, sink, files)
        return MegatronWriter(root, self.planned, self.args, self.target_schema, self.layout,
                              options.use_distributed_optimizer, options.zip_crc32, sink=sink, files=files)


def output_dtype_of(planned: list, requested: torch.dtype | None) -> torch.dtype:
    return requested or next((dtype for _, _, dtype in planned if dtype.is_floating_point), torch.float32)


def nbytes_of(planned: list) -> int:
    return sum(tensor_nbytes(shape, dtype) for _, shape, dtype in planned)


def tokenizer_source(options: Options, source: Source) -> str | None:
    """--tokenizer_name, else the tokenizer the source carries (a Megatron-Bridge checkpoint's, a model directory's)."""
    carried = source.reader.tokenizer_dir
    return options.tokenizer_name or (str(carried) if carried else None)


def torch_dist_writer(staging: Path, plan: Plan, sink: DiskSink, share: Share | None) -> Any:
    """A torch_dist writer (of one process's data file, with a ``share``); as Megatron-Bridge saves, the data goes
    to iter_0000000 with its files beside it."""
    from ..formats.torch_dist_writer import TorchDistWriter, data_file_name
    options, source, args = plan.options, plan.source, plan.args
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 0}
    own = {"data_file": data_file_name(share.process), "writes_objects": share.writes_objects} if share else {}
    transformer_engine = plan.target_schema == schema.MCORE_TE
    if not plan.bridge:
        return TorchDistWriter(staging, common, transformer_engine, plan.planned, sink=sink, **own)
    tokenizer = tokenizer_source(options, source)
    run_config = run_config_for(args, source.arch, source.family, options.save_path.resolve(), tokenizer is not None)
    files = functools.partial(write_bridge_files, staging, run_config, tokenizer and Path(tokenizer))
    return TorchDistWriter(staging, common, transformer_engine, plan.planned, iteration=0, before_tracker=files,
                           sink=sink, **own)


