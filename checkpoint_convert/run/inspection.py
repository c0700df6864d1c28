"""See inside a checkpoint without converting it, and check its integrity.

The description comes from the same walk a conversion makes, run on ``meta`` tensors: every family
table entry is located in the source, its shards are merged by the engine's own code (which checks
shapes across ranks) and the rank files or data files that held it are recorded. No tensor data is
read unless ``--check`` asks for it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..base.memory import Arena
from ..engine.blockwise import max_abs_diff
from ..engine.mindspeed_mm import MindSpeedSource, is_mindspeed_mm
from ..engine.mindspeed_mm import place as mindspeed_place
from ..engine.sources import Source
from ..engine.streams import LAYER, Item, all_finite, megatron_name, place, release_all, walk
from ..formats import megatron_schema as schema
from ..formats.hf_io import tensor_nbytes
from ..formats.megatron_io import RankKey
from ..model.parallel import Style, style_in_schema


def item_name(item: Item, prefix: str = "") -> str:
    """A logical Megatron name with the global layer index (``*`` for the expert axis); multi-token prediction
    layers' names are global (``mtp.layers.i.``); a tower's entries under the tower's names, the language model's
    under ``prefix`` (a multi-tower layout's)."""
    if item.tower:
        return item.tower.megatron_name(item.param, item.layer)
    name = item.param.megatron.replace("{expert}", "*")
    return prefix + (f"{schema.LAYER_PREFIX}{item.layer}.{name}" if item.group == LAYER else name)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def megatron_rows(source: Source) -> list[dict[str, Any]]:
    """One row per family-table entry: merged shape (vocab unpadded), dtype, and the files holding it."""
    tensors, tree = source.tensors, source.reader
    rows = []
    for item in walk(source.family, source.arch):
        if item.param.zero_in_megatron or item.param.shared:  # no tensor, or the main embedding / output layer
            continue
        before = set(tensors.consumed)
        full = tensors.full(item, meta=True)
        read = tensors.consumed - before
        holders = sorted({holder for rank, local, name in read for holder in tree.holders(rank, name, local)})
        rows.append({"name": item_name(item, source.family.megatron_prefix), "shape": list(full.shape),
                     "dtype": _dtype(full.dtype),
                     "held_by": holders})
    return rows


def hf_rows(source: Source) -> list[dict[str, Any]]:
    checkpoint = source.reader
    metas = {name: checkpoint.stored_meta(name) for name in checkpoint.names()}  # as stored: FP8 weights as FP8
    return [{"name": name, "shape": list(meta.shape), "dtype": _dtype(meta.dtype),
             "held_by": [checkpoint.weight_map[name].name]} for name, meta in metas.items()]


def extra_state_rows(source: Source) -> list[dict[str, Any]]:
    """One row per module's extra state (merged over ranks): its forms, bytes on all ranks, holders."""
    rows: dict[str, dict[str, Any]] = {}
    for name, form, nbytes, holder in source.reader.extra_states():
        row = rows.setdefault(name, {"name": name, "form": [], "bytes": 0, "held_by": []})
        row["bytes"] += nbytes
        row["form"] = sorted({*row["form"], form})
        row["held_by"] = sorted({*row["held_by"], holder})
    return list(rows.values())


def _tower_splits(source: Source) -> dict[str, list[int]]:
    """A MindSpeed-MM tree's other towers' layers per pipeline rank, counted from its files (the language model's are
    ``layers_per_stage``)."""
    splits = source.tensors.splits if isinstance(source.tensors, MindSpeedSource) else {}
    return {name: list(split) for name, split in splits.items() if name is not None}


def _megatron_header(source: Source) -> dict[str, Any]:
    tree = source.reader
    tp, pp, ep = tree.args_layout
    embedding = (source.family.megatron_prefix if is_mindspeed_mm(source) else "") + schema.EMBEDDING
    stored_rows = tree.tensor(RankKey(0, 0, 0), embedding, None, meta=True).shape[0] * tree.tp
    return {
        "format": f"{tree.producer} {tree.ckpt_format}", "schema": tree.schema, "checkpoint_version": tree.version,
        "iteration": tree.iteration,
        "layout": {"tp": tp, "pp": pp, "ep": ep, "vpp": tree.vpp,
                   "layers_per_stage": tree.stage_layer_counts() if tree.ckpt_format == "torch" else None,
                   **({"towers": _tower_splits(source)} if _tower_splits(source) else {})},
        "vocab": {"true": source.arch.vocab_size, "padded": stored_rows},
        "skipped": list(getattr(tree, "skipped", [])),
        "extra_state": extra_state_rows(source),
    }


def _hf_header(source: Source) -> dict[str, Any]:
    files = sorted({file.suffix.lstrip(".") for file in source.reader.weight_map.values()})
    return {"format": f"huggingface {'/'.join(files)}", "schema": None, "checkpoint_version": None,
            "iteration": None, "layout": {"tp": 1, "pp": 1, "ep": 1, "vpp": 1, "layers_per_stage": [source.arch.num_layers]},
            "vocab": {"true": source.arch.vocab_size, "padded": source.arch.vocab_size}, "skipped": [],
            "extra_state": [], "quantization": _hf_quantization(source)}


def _hf_quantization(source: Source) -> dict[str, Any] | None:
    """An FP8 block-quantized model's ``quantization_config``, with how many weights carry block scales."""
    config = source.reader.config.get("quantization_config")
    if not isinstance(config, dict):
        return None
    return {**config, "scaled_weights": len(source.reader.scales)}


def describe(source: Source, path: str) -> dict[str, Any]:
    """Everything about a checkpoint that its files tell, as plain data (``--json`` prints it as is)."""
    header = _megatron_header(source) if source.kind == "megatron" else _hf_header(source)
    rows = megatron_rows(source) if source.kind == "megatron" else hf_rows(source)
    architecture = {key: (_dtype(value) if isinstance(value, torch.dtype) else value)
                    for key, value in dataclasses.asdict(source.arch).items()}
    return {"path": path, "family": source.family.name, **header,
            "dtypes": sorted({row["dtype"] for row in rows}), "parameters": sum(math.prod(row["shape"]) for row in rows),
            "bytes": sum(tensor_nbytes(row["shape"], getattr(torch, row["dtype"])) for row in rows),
            "architecture": architecture, "tensors": rows}


def _replicas_differ(source: Source, item: Item) -> list[str]:
    """Norms, routers and row-parallel biases must be equal on every tensor-parallel rank."""
    tree, param = source.reader, item.param
    style = style_in_schema(param.style, tree.schema == schema.MCORE_TE)
    replicated = style is Style.REPLICATED or (param.style is Style.ROW and param.megatron.endswith(".bias"))
    if tree.tp == 1 or not replicated or param.experts or param.zero_in_megatron:
        return []
    if is_mindspeed_mm(source):  # flat keys, every tower its own split
        (stage, name), local = mindspeed_place(source.tensors.splits, source.family, item), None
    else:  # a multi-tower model's towers: whole keys on the first stage
        (stage, local), name = place(source.tensors.stages, item), megatron_name(item)
    reference = tree.tensor(RankKey(0, stage, 0), name, local)
    problems = []
    for tp in range(1, tree.tp):
        other = tree.tensor(RankKey(tp, stage, 0), name, local)
        delta = max_abs_diff(reference, other)
        if delta != 0:
            problems.append(f"{item_name(item, source.family.megatron_prefix)}: replicated tensor differs between TP ranks 0 and {tp} "
                            f"(max |diff| {delta:.3g})")
        release_all([other])
    release_all([reference])
    return problems


def check(source: Source) -> list[str]:
    """Read every tensor once: replicas equal across TP ranks, values finite, no tensor left unread.

    One tensor at a time: ``all_finite`` reduces in place, and a Megatron source merges into memory
    reused from one tensor to the next (``memory.Arena``); a tensor is done with before the next is made.
    """
    problems = []
    if source.kind == "megatron":
        source.tensors.arena = Arena()
    for item in walk(source.family, source.arch):
        full = source.tensors.full(item, meta=False)
        if full.is_floating_point() and not all_finite(full):
            problems.append(f"{item_name(item)}: contains NaN or Inf values")
        if source.kind == "megatron":
            problems += _replicas_differ(source, item)
    source.tensors.release()
    problems += [f"{name}: no conversion rule reads this tensor" for name in source.tensors.unconsumed()]
    return problems


def _table(headers: tuple[str, ...], cells: list[tuple[str, ...]]) -> list[str]:
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    return lines + ["  " + "  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]


def _tensor_table(rows: list[dict[str, Any]]) -> list[str]:
    cells = [(row["name"], "x".join(map(str, row["shape"])) or "scalar", row["dtype"], ",".join(row["held_by"]))
             for row in rows]
    return _table(("tensor", "shape", "dtype", "held by"), cells)


def _extra_state_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    total = sum(row["bytes"] for row in rows)
    cells = [(row["name"], ",".join(row["form"]), f"{row['bytes']:,}", ",".join(row["held_by"])) for row in rows]
    return ([f"extra state (not converted, never unpickled): {len(rows)} entries, {total:,} bytes"]
            + _table(("module", "form", "bytes", "held by"), cells))


def _virtual_stages(vpp: int) -> str:
    return f"  VPP {vpp} (stages in Megatron's interleaved order: chunk 0 of every PP rank, then chunk 1, ...)" if vpp > 1 else ""


def _pattern_by_stage(pattern: str, stages: list[int] | None) -> str:
    """A hybrid model's layer pattern with ``|`` between pipeline stages (Megatron-LM 0.18's spelling)."""
    parts, start = [], 0
    for count in stages or [len(pattern)]:
        parts.append(pattern[start:start + count])
        start += count
    return "|".join(parts)


def as_text(report: dict[str, Any]) -> str:
    layout = report["layout"]
    stages = ",".join(map(str, layout["layers_per_stage"])) if layout["layers_per_stage"] else "global tensors"
    dense = not report["architecture"].get("num_experts")
    arch = " ".join(f"{key}={value}" for key, value in report["architecture"].items()
                    if value not in (None, {}, "") and not (dense and key.startswith("moe_")))
    lines = [
        f"path: {report['path']}",
        f"format: {report['format']}" + (f" (schema {report['schema']})" if report["schema"] else ""),
        f"family: {report['family']}  checkpoint_version: {report['checkpoint_version']}  "
        f"iteration: {report['iteration']}",
        f"layout: TP {layout['tp']}  PP {layout['pp']}  EP {layout['ep']}" + _virtual_stages(layout["vpp"])
        + f"  layers per stage: {stages}" + "".join(f"  {tower} layers per stage: {','.join(map(str, split))}"
                                                     for tower, split in layout.get("towers", {}).items()),
        f"dtypes: {', '.join(report['dtypes'])}",
        f"parameters: {report['parameters']:,} ({report['bytes'] / 1e6:,.1f} MB)",
        f"vocab: {report['vocab']['true']} (padded {report['vocab']['padded']})",
        f"architecture: {arch}",
    ]
    if report["architecture"].get("layer_pattern"):
        lines.append(f"layers: {_pattern_by_stage(report['architecture']['layer_pattern'], layout['layers_per_stage'])}"
                     " (M Mamba-2, * attention, - MLP, E experts; | between pipeline stages)")
    if report.get("quantization"):
        quantization = report["quantization"]
        lines.append("quantization: " + "  ".join(f"{key}={value}" for key, value in quantization.items()))
    if report["skipped"]:
        lines.append(f"not model weights (ignored): {len(report['skipped'])} entries, e.g. {report['skipped'][0]}")
    return "\n".join(lines + [f"tensors ({len(report['tensors'])}):"] + _tensor_table(report["tensors"])
                     + _extra_state_table(report["extra_state"]))
