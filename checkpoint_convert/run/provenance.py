"""The provenance record written with every output: how it was made, from what, by which version.

``conversion.json`` sits next to ``config.json`` in a Hugging Face output, and inside the iteration
directory of a Megatron output (``release/conversion.json``, ``iter_0000000/`` for Megatron-Bridge),
where Megatron-LM, megatron-core's ``dist_checkpointing``, Megatron-Bridge and this tool's readers
only open the files they know by name. It is written through the output's sink into the staging
directory, so it is part of the atomic output, and a dry run sizes it like any other file.

The source fingerprint lists every file of the source's weights directory (the Hugging Face model
directory, or the Megatron iteration directory, recursively, plus the tracker) with its size and
modification time; ``--hash`` adds each file's SHA-256 (reading the source once more).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..base.distribution import DISTRIBUTION, tool_version
from ..engine.sources import Source
from ..formats.hf_io import read_json_object
from ..formats.megatron_io import TRACKER
from ..formats.mindspeed_mm import MINDSPEED_MM
from ..formats.sinks import DiskSink
from ..formats.torch_dist_layout import TRAIN_STATE_TRACKER
from .plan import Plan

RECORD_FILE = "conversion.json"
RECORD_VERSION = 1


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _source_files(source: Source) -> tuple[Path, list[Path]]:
    """The directory the record's paths are relative to, and the files holding the source's weights."""
    if source.kind == "hf":
        base = source.reader.path
        return base, sorted(path for path in base.iterdir() if path.is_file())
    iter_dir = source.reader.iter_dir
    base = iter_dir.parent
    trackers = [base / name for name in (TRACKER, TRAIN_STATE_TRACKER) if (base / name).is_file()]
    return base, trackers + sorted(path for path in iter_dir.rglob("*") if path.is_file())


def fingerprint(source: Source, hashes: bool, placeholder_hashes: bool = False) -> list[dict[str, Any]]:
    """Size, modification time and (``hashes``) SHA-256 of every source file; ``placeholder_hashes``: digests of
    the right length that a dry run, which reads no data, puts in their place."""
    base, files = _source_files(source)
    entries = []
    for path in files:
        stat = path.stat()
        entry = {"path": path.relative_to(base).as_posix(), "size": stat.st_size, "modified": _utc(stat.st_mtime)}
        if hashes:
            entry["sha256"] = "-" * 64 if placeholder_hashes else _sha256(path)
        entries.append(entry)
    return entries


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe_source(source: Source) -> dict[str, Any]:
    """Format, family, schema, layout and dtype of a source, as the record and a dry run show them."""
    if source.kind == "hf":
        kinds = sorted({file.suffix.lstrip(".") for file in source.reader.weight_map.values()})
        return {"format": f"huggingface {'/'.join(kinds)}", "family": source.family.name, "schema": None,
                "layout": {"tp": 1, "pp": 1, "ep": 1, "vpp": 1, "layers_per_stage": [source.arch.num_layers]},
                "dtype": _dtype_name(source.arch.params_dtype)}
    tree = source.reader
    tp, pp, ep = tree.args_layout
    stages = tree.stage_layer_counts() if tree.ckpt_format == "torch" else None
    return {"format": f"{tree.producer} {tree.ckpt_format}", "family": source.family.name, "schema": tree.schema,
            "iteration": tree.iteration, "layout": {"tp": tp, "pp": pp, "ep": ep, "vpp": tree.vpp,
                                                    "layers_per_stage": stages},
            "dtype": _dtype_name(source.arch.params_dtype)}


def describe_target(plan: Plan) -> dict[str, Any]:
    """Format, schema, layout and dtype of the output a plan writes."""
    dtype = _dtype_name(plan.output_dtype)
    if plan.to_hf:
        kind = "safetensors" if plan.options.safe_serialization else "bin"
        kind += f" {plan.options.hf_quantization}" if plan.options.hf_quantization else ""  # FP8 weights, block scales
        return {"format": f"huggingface {kind}", "family": plan.source.family.name, "schema": None, "layout": None,
                "dtype": dtype}
    layout = plan.layout
    producer = "megatron-bridge" if plan.bridge else "mindspeed-mm" if plan.target_schema == MINDSPEED_MM else "megatron"
    return {"format": f"{producer} {plan.ckpt_format}", "family": plan.source.family.name,
            "schema": plan.target_schema, "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                                                     "vpp": layout.vpp, "dp": layout.dp,
                                                     "layers_per_stage": list(layout.stages)},
            "dtype": dtype}


def record_for(plan: Plan, sized: bool = False) -> dict[str, Any]:
    """The provenance record of a plan's output; ``sized``: for a dry run (no source file is hashed)."""
    options = plan.options
    invocation = options.invocation or {}
    return {
        "record_version": RECORD_VERSION,
        "tool": {"name": DISTRIBUTION, "version": tool_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": invocation.get("command"),
        "settings": invocation.get("settings"),
        "setting_sources": invocation.get("sources"),  # each setting's: command line, environment, config file, default
        "source": {"path": str(options.load_path.resolve()), **describe_source(plan.source),
                   "files": fingerprint(plan.source, options.hash_source, placeholder_hashes=sized)},
        "target": {"path": str(options.save_path.resolve()), **describe_target(plan)},
    }


def write_record(directory: Path, sink: DiskSink, plan: Plan) -> None:
    sink.write_text(directory / RECORD_FILE, json.dumps(record_for(plan, sink.sizes_only), indent=2) + "\n")


def read_record(source: Source) -> dict[str, Any] | None:
    """The provenance record stored with a checkpoint (its weights directory), or None."""
    directory = source.reader.path if source.kind == "hf" else source.reader.iter_dir
    file = directory / RECORD_FILE
    return read_json_object(file, "provenance record") if file.is_file() else None


def as_text(record: dict[str, Any]) -> list[str]:
    """A few lines for ``inspect``: who made this checkpoint from what, and when."""
    tool, source, target = record.get("tool") or {}, record.get("source") or {}, record.get("target") or {}
    command = record.get("command")
    hashed = any("sha256" in entry for entry in source.get("files") or [])
    return [
        f"made by: {tool.get('name')} {tool.get('version')} on {record.get('created')}",
        f"  from: {source.get('path')} ({source.get('format')}, {len(source.get('files') or [])} files"
        f"{', SHA-256 recorded' if hashed else ''})",
        f"  as: {target.get('format')} {_layout_text(target.get('layout'))}".rstrip(),
        f"  command: {' '.join(command) if command else 'not recorded'}",
    ]


def _layout_text(layout: dict[str, Any] | None) -> str:
    if not layout:
        return ""
    return " ".join(f"{key.upper()} {layout[key]}" for key in ("tp", "pp", "ep", "vpp") if key in layout)
