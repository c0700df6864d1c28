"""MindSpeed-MM's layout of a multi-tower model as a source and a target of full tensors.

Placement follows MindSpeed-MM's converter (``hf_to_mm.partition_state_dict_by_pp``, ``merge_vpp_index``): every
tower has its own pipeline split (vision layers per rank beside language layers per rank, one list entry per
pipeline rank); a tower's entries before its layers go to its first rank with layers, those after them to its last
rank with layers, its layers numbered from 0 on each rank. Tensor-parallel splits are the table's styles (its
``RowSplit`` is our COLUMN, ``ColSplit`` ROW, ``GLUSplit`` GLU_COLUMN); the word embeddings and output layer are
split by rows without vocab padding. With tied embeddings and a pipeline, the last language rank holds a copy of the
word embeddings as ``output_layer.weight`` (its ``TieOp``).
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch

from ..base.errors import BadInputError
from ..formats.megatron_io import RankKey
from ..formats.mindspeed_mm import LANGUAGE_LAYER, MindSpeedTree
from ..model.arch import ModelArch
from ..model.family import FamilySpec, Tower, family_named, in_layout
from ..model.parallel import Style, merge_from_tp, split_for_tp, stage_offsets
from .relayout import read_in_layout, read_through
from .streams import FIRST, LAST, LAYER, Item, _ReleasesReadPages, param_parts

Splits = dict[str | None, tuple[int, ...]]  # tower name (None: the language model) -> layers per pipeline rank
OUTPUT_LAYER = "output_layer.weight"


def mindspeed_mm_family(family: FamilySpec) -> FamilySpec:
    """The family with MindSpeed-MM's towers and names; refused in one line when it declares none."""
    if family.mindspeed_mm is None:
        raise BadInputError(f"a {family.name} model has no MindSpeed-MM layout here (--megatron_format mindspeed_mm)")
    return in_layout(family, family.mindspeed_mm)


def layer_prefix(family: FamilySpec, tower: Tower | None) -> str:
    """The flat key prefix of a tower's layers (``{layer}`` left in)."""
    return tower.megatron_prefix + tower.megatron_layer_prefix if tower else family.megatron_prefix + LANGUAGE_LAYER


def _tower_layers(family: FamilySpec, arch: ModelArch, tower: Tower | None) -> int:
    return tower.num_layers(arch) if tower else arch.num_layers


def checked_splits(family: FamilySpec, arch: ModelArch, language: Sequence[int],
                   vision: Sequence[int] | None) -> Splits:
    """Every tower's split: the language model's stages, the given vision split (default: every vision layer on the
    first rank, as MindSpeed-MM's examples place them); each must have one entry a rank and sum to its depth."""
    splits: Splits = {None: tuple(language)}
    for tower in family.towers:
        depth = _tower_layers(family, arch, tower)
        given = tuple(vision) if vision is not None else (depth,) + (0,) * (len(language) - 1)
        if len(given) != len(language) or sum(given) != depth or min(given) < 0:
            raise BadInputError(f"--vision_pipeline_layers {','.join(map(str, given))} must list {len(language)} "
                                f"pipeline ranks and sum to the {depth} layers of the {tower.name} tower")
        splits[tower.name] = given
    return splits


def place(splits: Splits, family: FamilySpec, item: Item) -> tuple[int, str]:
    """(pipeline rank, flat key) of an item in MindSpeed-MM's rank files."""
    stages = splits[item.tower.name if item.tower else None]
    holding = [rank for rank, count in enumerate(stages) if count] or [0]
    if item.group == FIRST:
        stage, local = holding[0], None
    elif item.group == LAST:
        stage, local = holding[-1], None
    else:
        offsets = stage_offsets(stages)
        stage = next(rank for rank, start in enumerate(offsets) if item.layer < start + stages[rank])
        local = item.layer - offsets[stage]
    if item.tower:
        return stage, item.tower.megatron_name(item.param, local)
    within = LANGUAGE_LAYER.format(layer=local) if item.group == LAYER else ""
    return stage, family.megatron_prefix + within + item.param.megatron


def _style(item: Item, tp: int, arch: ModelArch) -> Style:
    """The table's style; the vocabulary is split by rows, unpadded: it must divide evenly."""
    if item.param.style is not Style.VOCAB:
        return item.param.style
    if arch.vocab_size % tp:
        raise BadInputError(f"MindSpeed-MM splits the {arch.vocab_size} word embeddings unpadded: tensor parallel "
                            f"size {tp} must divide them")
    return Style.COLUMN


def vocab_rows(family: FamilySpec, item: Item, tp: int, arch: ModelArch) -> list[int] | None:
    """The row blocks of a vocabulary the layout splits unevenly (``TowerLayout.uneven_vocab``: the first
    vocab % TP ranks hold one row more); None when it is split evenly."""
    uneven = family.mindspeed_mm is not None and family.mindspeed_mm.uneven_vocab
    if item.param.style is not Style.VOCAB or not uneven or arch.vocab_size % tp == 0:
        return None
    return [arch.vocab_size // tp + int(rank < arch.vocab_size % tp) for rank in range(tp)]


def _require_plain(item: Item) -> None:
    if item.param.experts or item.param.shared or item.param.zero_in_megatron:
        raise BadInputError(f"'{item.param.megatron}' has no place in MindSpeed-MM's layout here")


class MindSpeedTarget:
    """Tensor-parallel shards keyed by (rank, flat key inside the rank file's ``model`` dict)."""

    def __init__(self, family: FamilySpec, arch: ModelArch, tp: int, splits: Splits) -> None:
        self.family, self.arch, self.tp, self.splits = family, arch, tp, splits

    def emit(self, item: Item, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        _require_plain(item)
        stage, key = place(self.splits, self.family, item)
        rows = vocab_rows(self.family, item, self.tp, self.arch)
        shards = list(torch.split(full, rows)) if rows else split_for_tp(
            full, _style(item, self.tp, self.arch), self.tp, param_parts(item.param, self.arch))
        out = [((RankKey(tp, stage, 0), key), shard) for tp, shard in enumerate(shards)]
        pipeline = len(self.splits[None])
        if item.param.style is Style.VOCAB and self.arch.tie_embeddings and item.group == FIRST and pipeline > 1:
            last = place(self.splits, self.family, Item(LAST, item.param, None))[0]
            copy = self.family.megatron_prefix + OUTPUT_LAYER
            out += [((RankKey(tp, last, 0), copy), shard) for tp, shard in enumerate(shards)]
        return out


class MindSpeedSource(_ReleasesReadPages):
    """Full tensors merged from a MindSpeed-MM tree's tensor-parallel shards."""

    def __init__(self, tree: MindSpeedTree, family: FamilySpec, arch: ModelArch) -> None:
        super().__init__()
        self.tree, self.family, self.arch = tree, family, arch
        tree.language_layers = layer_prefix(family, None)
        self.splits = source_splits(tree, family, arch)
        self.consumed: set[tuple[RankKey, None, str]] = set()  # as Megatron sources': (rank, layer, key)
        self.left_out: set[str] = set()

    def full(self, item: Item, meta: bool) -> torch.Tensor:
        if not meta:
            self._next_item()
        _require_plain(item)
        stage, key = place(self.splits, self.family, item)
        shards = []
        for tp in range(self.tree.tp):
            rank = RankKey(tp, stage, 0)
            shards.append(self.tree.tensor(rank, key, meta=meta))
            self.consumed.add((rank, None, key))
        if not meta:
            self._read += shards
        rows = vocab_rows(self.family, item, self.tree.tp, self.arch)
        if len({(tuple(s.shape[1 if rows else 0:]), s.dtype) for s in shards}) > 1 or (
                rows and [s.shape[0] for s in shards] != rows):
            raise BadInputError(f"'{key}' has different shapes or dtypes across TP ranks", self.tree.files[
                RankKey(0, stage, 0)])
        if rows:
            return torch.cat(shards, dim=0)
        return merge_from_tp(shards, _style(item, self.tree.tp, self.arch), parts=param_parts(item.param, self.arch))

    def unconsumed(self) -> list[str]:
        """Tensors no table entry read (the tied output layer's copy excepted)."""
        copy = self.family.megatron_prefix + OUTPUT_LAYER if self.arch.tie_embeddings else None
        return [f"{self.tree.files[rank].parent.name}:{key}" for rank in sorted(self.tree.files, key=str)
                for key in self.tree.flat(rank) if (rank, None, key) not in self.consumed and key != copy
                and key not in self.left_out]


def source_splits(tree: MindSpeedTree, family: FamilySpec, arch: ModelArch) -> Splits:
    """Every tower's split, counted from the files' layer keys; they must hold the architecture's depths."""
    splits: Splits = {}
    for tower in (None, *family.towers):
        counts = tuple(tree.layer_counts(layer_prefix(family, tower)))
        depth = _tower_layers(family, arch, tower)
        if sum(counts) != depth:
            name = tower.name if tower else "language model"
            raise BadInputError(f"the rank files hold {list(counts)} layers of the {name} per pipeline rank, not the "
                                f"{depth} the Hugging Face config describes", tree.iter_dir)
        splits[tower.name if tower else None] = counts
    return splits


def is_mindspeed_mm(source: Any) -> bool:
    return source.kind == "megatron" and source.reader.producer == "mindspeed-mm"


def read_as_mindspeed_mm(source: Any) -> None:
    """A source read through MindSpeed-MM's tables: a Hugging Face one by its names, another Megatron layout's
    (Megatron-Bridge's) through the Hugging Face tensors both tables name (``relayout``)."""
    if is_mindspeed_mm(source):
        return  # read through them already
    read_through(source, mindspeed_mm_family(source.family))


def read_as_registered(source: Any) -> None:
    """A MindSpeed-MM source read through the family's own tables (Megatron-Bridge's layout), for another output."""
    if is_mindspeed_mm(source):
        read_in_layout(source, family_named(source.family.name))
