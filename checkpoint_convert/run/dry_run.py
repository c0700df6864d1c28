"""``--dry_run``: everything a conversion would do, checked and described, with nothing written.

The plan is the conversion's own (:func:`converter.plan_conversion`: the source opened, every output
tensor planned on ``meta`` tensors and checked, the Megatron args built by the function that writes
them, a Hugging Face config checked against the transformers model). The files and their sizes come
from running the real writers (:func:`converter.write_output`) on ``meta`` tensors into a
:class:`~checkpoint_convert.sinks.SizingSink`, which creates no file or directory: file names, shard
splits, zip and pickle overheads, the ``.metadata`` of torch_dist and the provenance record are the
real ones. The one thing a real run would add is time.

Memory is README's streaming bound: the start-up size (this process's peak resident memory after
opening the source and planning, which imports what the conversion imports) plus two copies of the
largest tensor in flight (a full, merged tensor in the source's or the output's dtype) plus 100 MB.
"""
from __future__ import annotations

import resource
import warnings
from typing import Any

import torch

from ..base.errors import BadInputError
from ..base.memory import read_only_file_mappings
from ..formats.hf_io import tensor_nbytes
from ..formats.megatron_args import dtype_from_name
from ..formats.sinks import SizingSink
from .claim import holder
from .converter import Options, Plan, checked_hf_config, open_source, plan_conversion, write_output
from .distributed import launched
from .output import DISK_MARGIN, check_free_space, check_paths
from .provenance import describe_source, describe_target
from .shares import split_outputs

HEADROOM = 100 * 2**20  # README's streaming bound: start-up + 2 x largest tensor + 100 MB


def _fill_with_meta(plan: Plan, writer: Any) -> None:
    """Hand the writer every planned tensor, in the order a conversion produces them, as shape and dtype only."""
    for key, shape, dtype in plan.planned:
        writer.write(key, torch.empty(shape, dtype=dtype, device="meta"))


def largest_tensor_bytes(plan: Plan) -> int:
    """The largest tensor a conversion holds at once: a full (merged, unsplit) tensor, in the source's dtype or
    cast to the output's, or an output tensor."""
    out_size = torch.empty((), dtype=plan.output_dtype).element_size()
    largest = max((tensor_nbytes(shape, dtype) for _, shape, dtype in plan.planned), default=0)
    for item in plan.items:
        full = plan.source.tensors.full(item, meta=True)
        largest = max(largest, full.nbytes, full.numel() * out_size)
    return largest


def _startup_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _plain(value: Any) -> Any:
    """A Megatron args value as JSON shows it (dtypes and Megatron's enums by name)."""
    return value if isinstance(value, (bool, int, float, str, type(None), list, dict)) else str(value)


def _sized_plan(options: Options) -> tuple[Plan, SizingSink, list[str]]:
    """The plan, the files its writers would create, and the warnings planning raised."""
    dtype = dtype_from_name(options.params_dtype)
    with read_only_file_mappings(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = open_source(options)
        plan = plan_conversion(options, source, dtype)
        config = checked_hf_config(plan) if plan.to_hf else None
        sink = SizingSink(options.save_path.resolve())
        write_output(plan, sink.root, sink, lambda writer: _fill_with_meta(plan, writer), lambda: config)
    return plan, sink, list(dict.fromkeys(str(warning.message) for warning in caught))


def plan_report(options: Options) -> dict[str, Any]:
    """What converting with ``options`` would write, and need, as plain data (``--json`` prints it as is)."""
    check_paths(options.load_path, options.save_path, options.overwrite)
    if options.to not in ("hf", "megatron"):
        raise BadInputError(f"--to must be 'hf' or 'megatron', not '{options.to}'")
    plan, sink, warned = _sized_plan(options)
    files = [{"path": path, "bytes": size, "tensors": sink.tensors.get(path, 0)} for path, size in sorted(sink.sizes.items())]
    largest = largest_tensor_bytes(plan)
    startup = _startup_bytes()
    problems = []
    try:
        free = check_free_space(sink.root.parent, plan.nbytes)
    except BadInputError as error:
        free, problems = None, [str(error)]
    running = holder(options.save_path)
    if running is not None:
        problems.append(f"{options.save_path}: another conversion is writing this save path ({running})")
    return {
        "dry_run": True,
        "source": {"path": str(options.load_path), **describe_source(plan.source)},
        "target": {"path": str(options.save_path), **describe_target(plan)},
        "files": files,
        "total_bytes": sum(entry["bytes"] for entry in files),
        "tensor_bytes": plan.nbytes,
        "disk": {"directory": str(sink.root.parent), "free_bytes": free, "needed_bytes": plan.nbytes + DISK_MARGIN},
        "memory": {"startup_bytes": startup, "largest_tensor_bytes": largest, "headroom_bytes": HEADROOM,
                   "peak_bytes": startup + 2 * largest + HEADROOM},
        "megatron_args": None if plan.to_hf or plan.args is None  # MindSpeed-MM's rank files hold no args
        else {key: _plain(value) for key, value in sorted(vars(plan.args).items())},
        "processes": _processes(plan),
        "warnings": warned,
        "problems": problems,
    }


def _processes(plan: Plan) -> list[dict[str, Any]] | None:
    """Under torchrun (more than one process): what each process would write and read (see ``shares``)."""
    placed = launched()
    if placed is None:
        return None
    split = split_outputs(plan, placed[1])
    return [{"process": process, "files": len(split.files(process)), "bytes_written": split.written[process],
             "source_bytes_read": split.read[process]} for process in range(split.processes)]


def _gb(count: int | None) -> str:
    return "unknown" if count is None else f"{count / 1e9:.3f} GB"


def _layout(described: dict[str, Any]) -> str:
    layout = described.get("layout")
    if not layout:
        return ""
    sizes = " ".join(f"{key.upper()} {layout[key]}" for key in ("tp", "pp", "ep", "vpp", "dp") if key in layout)
    stages = layout.get("layers_per_stage")
    return f", {sizes}" + (f", layers per stage {','.join(map(str, stages))}" if stages else "")


def _side(name: str, described: dict[str, Any]) -> str:
    schema = f", schema {described['schema']}" if described.get("schema") else ""
    return (f"{name}: {described['path']} ({described['format']}, {described['family']}{schema}"
            f"{_layout(described)}, {described['dtype']})")


def as_text(report: dict[str, Any]) -> str:
    memory, disk, files = report["memory"], report["disk"], report["files"]
    width = max((len(f"{entry['bytes']:,}") for entry in files), default=1)
    lines = [_side("source", report["source"]), _side("target", report["target"]),
             f"files ({len(files)}, {_gb(report['total_bytes'])}; tensor data {_gb(report['tensor_bytes'])}):"]
    lines += [f"  {entry['bytes']:>{width},} B  {entry['tensors']:>5} tensors  {entry['path']}" for entry in files]
    lines += [f"disk: needs {_gb(disk['needed_bytes'])} (tensor data + {DISK_MARGIN >> 20} MB margin), "
              f"{_gb(disk['free_bytes'])} free in {disk['directory']}",
              f"memory: about {_gb(memory['peak_bytes'])} peak = start-up {_gb(memory['startup_bytes'])} + 2 x largest "
              f"tensor {_gb(memory['largest_tensor_bytes'])} + {memory['headroom_bytes'] >> 20} MB"]
    if report["megatron_args"] is not None:
        lines.append(f"megatron args ({len(report['megatron_args'])} fields):")
        lines += [f"  {key} = {value!r}" for key, value in report["megatron_args"].items()]
    for share in report["processes"] or []:
        lines.append(f"process {share['process']}: {share['files']} files, {_gb(share['bytes_written'])} written, "
                     f"{_gb(share['source_bytes_read'])} of the source read")
    lines += [f"warning: {text}" for text in report["warnings"]]
    lines += [f"problem: {text}" for text in report["problems"]]
    lines.append("dry run: nothing was written")
    return "\n".join(lines)
