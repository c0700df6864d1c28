"""Planning a conversion into MindSpeed-MM's rank files (``formats/mindspeed_mm.py``, ``engine/mindspeed_mm.py``)."""
from __future__ import annotations

import torch

from ..base.errors import BadInputError
from ..engine.mindspeed_mm import (
    MindSpeedSource,
    MindSpeedTarget,
    checked_splits,
    read_as_mindspeed_mm,
    read_as_registered,
)
from ..engine.sources import Source
from ..engine.streams import plan_with_items, walk
from ..formats.megatron_args import ParallelLayout
from ..formats.mindspeed_mm import MINDSPEED_MM
from .plan import Options, Plan


def writes_mindspeed_mm(options: Options, source: Source) -> bool:
    """Asked for (``--megatron_format mindspeed_mm``), or a MindSpeed-MM source whose layout nothing else asks to
    change; ``--vision_pipeline_layers`` means nothing for another output. A MindSpeed-MM source written in another
    layout is read through the family's own tables from here on."""
    if options.megatron_format is not None:
        wanted = options.megatron_format == MINDSPEED_MM
    else:
        kept = options.megatron_bridge is None and options.megatron_ckpt_format in (None, "torch")
        wanted = kept and source.kind == "megatron" and source.reader.schema == MINDSPEED_MM
    if not wanted and options.vision_pipeline_layers:
        raise BadInputError("--vision_pipeline_layers splits MindSpeed-MM's vision tower: it needs "
                            "--megatron_format mindspeed_mm")
    if not wanted:
        read_as_registered(source)
    return wanted


def plan_mindspeed_mm(options: Options, source: Source, dtype: torch.dtype | None, layout: ParallelLayout) -> Plan:
    """The plan of MindSpeed-MM rank files: its names, every tower's pipeline split, no args."""
    if layout.vpp > 1 or layout.ep > 1 or options.megatron_ckpt_format == "torch_dist" or options.megatron_bridge:
        raise BadInputError("MindSpeed-MM rank files are written here without a virtual pipeline, expert parallelism "
                            "or torch_dist")
    read_as_mindspeed_mm(source)
    family, arch = source.family, source.arch
    for what, size in family.mindspeed_mm.tp_splits(arch) if family.mindspeed_mm.tp_splits else ():
        if size % layout.tp:
            raise BadInputError(f"tensor parallel size {layout.tp} does not divide the {size} {what}")
    vision = options.vision_pipeline_layers
    kept = source.tensors.splits if isinstance(source.tensors, MindSpeedSource) else {}
    if vision is None and len(kept.get(None, ())) == layout.pp and not options.pipeline_layers:
        vision = next((split for tower, split in kept.items() if tower is not None), None)
    target = MindSpeedTarget(family, arch, layout.tp, checked_splits(family, arch, layout.stages, vision))
    items = walk(family, arch)
    by_item = plan_with_items(items, source.tensors, target, dtype)
    return Plan(options, source, dtype, items, target, by_item, arch, layout, "torch", MINDSPEED_MM, False, None)
