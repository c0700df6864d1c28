"""The conversion engine: sources produce full Megatron-layout tensors, targets consume them.

A conversion walks the family table in file order (embeddings, each layer, final norm / output
layer). For each entry the source builds the full (un-parallel, unpadded) tensor in Megatron's
layout and the target turns it into output tensors keyed by where they go. Running the same walk on
``meta`` tensors first yields the complete plan (every output's shape and dtype, grouped by file)
and validates shapes before anything is read or written.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Container, Hashable, Iterable, Iterator

import torch

from ..base.errors import BadInputError, reason
from ..base.memory import Arena, release_file_pages, release_pages, shares_storage
from ..formats import megatron_schema as schema
from ..formats.hf_io import HFCheckpoint
from ..formats.megatron_io import MegatronTree, RankKey, reorder_legacy_qkv
from ..model.arch import ModelArch
from ..model.family import FamilySpec, Param, Tower
from ..model.parallel import (
    Style,
    cast,
    cat,
    expert_placement,
    merge_from_tp,
    pad_vocab,
    split_for_tp,
    stack,
    stage_offsets,
    style_in_schema,
    trim_vocab,
)
from .blockwise import cat_blockwise
from .mtp import check_shared_copy, main_hf_name, mtp_layer_kind, mtp_layer_params

FIRST, LAYER, LAST, MTP = "first", "layer", "last", "mtp"
QKV = "self_attention.linear_qkv."


@dataclass(frozen=True)
class Item:
    """One family-table entry at one place in the model (layer is None outside the layers; a multi-token
    prediction layer's entries are global Megatron names at Hugging Face layer ``num_layers + i``)."""

    group: str
    param: Param
    layer: int | None
    tower: Tower | None = None  # None: the language model (the family's own table)


def tower_items(tower: Tower, arch: ModelArch) -> list[Item]:
    """A tower's entries in order: before its layers, each layer's, after them."""
    items = [Item(FIRST, p, None, tower) for p in tower.params_for(FIRST, arch)]
    for layer in range(tower.num_layers(arch)):
        items += [Item(LAYER, p, layer, tower) for p in tower.params_for(LAYER, arch)]
    return items + [Item(LAST, p, None, tower) for p in tower.params_for(LAST, arch)]


def walk(family: FamilySpec, arch: ModelArch) -> list[Item]:
    """Every entry of the model in file order: the other towers (see ``towers``), then the language model."""
    items = [item for tower in family.towers for item in tower_items(tower, arch)]
    items += [Item(FIRST, p, None) for p in family.params_for(FIRST, arch)]
    for layer in range(arch.num_layers):
        items += [Item(LAYER, p, layer) for p in family.params_for(LAYER, arch, layer)]
    items += [Item(LAST, p, None) for p in family.params_for(LAST, arch)]
    for index in range(arch.mtp_num_layers):
        items += [Item(MTP, p, arch.num_layers + index) for p in mtp_layer_params(family, arch, index)]
    return items


def item_hf_names(family: FamilySpec, item: Item) -> list[str]:
    """An item's Hugging Face names: its tower's, or the language model's."""
    return item.tower.hf_names(item.param, item.layer) if item.tower else family.hf_names(item.param, item.layer)


def megatron_name(item: Item) -> str:
    """An item's Megatron name: a tower's whole key, or the language model's canonical (local-spec) name."""
    return item.tower.megatron_name(item.param, item.layer) if item.tower else item.param.megatron


def place(stages: list[int], item: Item) -> tuple[int, int | None]:
    """(pipeline stage, stage-local layer of the Megatron schema) of an item: a tower other than the language
    model is stored whole on the first stage, under keys of its own."""
    return (0, None) if item.tower else locate(stages, item.group, item.layer)


def locate(stages: list[int], group: str, layer: int | None) -> tuple[int, int | None]:
    """(pipeline stage, stage-local layer) of an item."""
    if group == FIRST:
        return 0, None
    if group in (LAST, MTP):
        return len(stages) - 1, None
    for stage, start in enumerate(stage_offsets(stages)):
        if layer < start + stages[stage]:
            return stage, layer - start
    raise BadInputError(f"layer {layer} is beyond the pipeline's {sum(stages)} layers")


class _ReleasesReadPages:
    """Remembers the source tensors read for the current item and hands their mapped pages back.

    By default the pages of an item are handed back when the next item is read: ``run()`` resumes
    only after the previous item's outputs were consumed. A caller that writes outputs later (on
    another thread) sets ``release_on_next_item = False`` and releases what ``take_read`` returns.
    """

    def __init__(self) -> None:
        self._read: list[torch.Tensor] = []
        self.release_on_next_item = True

    def release(self) -> None:
        """Return the memory-mapped pages of the tensors read since the last call."""
        release_all(self._read)
        self._read.clear()

    def take_read(self) -> list[torch.Tensor]:
        """The tensors read since the last call, now the caller's to release."""
        read, self._read = self._read, []
        return read

    def _next_item(self) -> None:
        if self.release_on_next_item:
            self.release()


def release_all(tensors: list[torch.Tensor]) -> None:
    """Hand back the mapped pages of every tensor (see ``memory.release_pages``)."""
    for tensor in tensors:
        release_pages(tensor)


class MegatronSource(_ReleasesReadPages):
    """Full tensors merged from a Megatron tree's tensor-parallel shards."""

    def __init__(self, tree: MegatronTree, family: FamilySpec, arch: ModelArch) -> None:
        super().__init__()
        self.tree, self.family, self.arch = tree, family, arch
        self.stages = tree.stage_layer_counts()
        if sum(self.stages) != arch.num_layers:
            raise BadInputError(f"stages hold {self.stages} layers but args say num_layers={arch.num_layers}",
                                tree.iter_dir)
        self.consumed: set[tuple[RankKey, int | None, str]] = set()
        self.left_out: set[str] = set()  # tensors the conversion was asked to leave out
        self.arena: Arena | None = None  # where merges go, for a caller done with an item before the next

    def full(self, item: Item, meta: bool) -> torch.Tensor:
        if not meta:
            self._next_item()
            if self.arena is not None:
                self.arena.next_entry()
        if item.param.zero_in_megatron:
            shape = item.param.zero_in_megatron(self.arch)
            return torch.zeros(shape, dtype=self.arch.params_dtype, device="meta" if meta else "cpu")
        stage, local = place(self.stages, item)
        if item.param.experts:
            return stack([self._merged(item, stage, local, *expert_placement(e, self.arch.num_experts, self.tree.ep),
                                             meta) for e in range(self.arch.num_experts)])
        full = self._merged(item, stage, local, 0, None, meta)
        for ep in range(1, self.tree.ep):  # non-expert tensors are replicated on every expert-parallel rank
            for tp in range(self.tree.tp):
                self.consumed.add((RankKey(tp, stage, ep), local, item.param.megatron))
        return trim_vocab(full, self.arch.vocab_size) if item.param.style is Style.VOCAB else full

    def _merged(self, item: Item, stage: int, local: int | None, ep: int, expert: int | None,
                meta: bool) -> torch.Tensor:
        """One tensor merged over the tensor-parallel ranks of (stage, expert-parallel rank)."""
        name = megatron_name(item).format(expert=expert)
        shards = []
        for tp in range(self.tree.tp):
            rank = RankKey(tp, stage, ep)
            shard = self.tree.tensor(rank, name, local, meta)
            if not meta:
                self._read.append(shard)
            if name.startswith(QKV):
                shard = reorder_legacy_qkv(shard, self.tree.version, self.arch.num_attention_heads // self.tree.tp,
                                           self.arch.kv_channels)
            shards.append(shard)
            self.consumed.add((rank, local, name))
        self._check_shapes(shards, name, item, stage)
        style = style_in_schema(item.param.style, self.tree.schema == schema.MCORE_TE)
        merged = merge_from_tp(shards, style, cat if meta else self._join, param_parts(item.param, self.arch))
        if not meta and not any(shares_storage(merged, shard) for shard in shards):
            self.release()  # the merge copied the shards: their mapped pages are not needed any more
        return merged

    def _join(self, pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
        """``cat`` of shards, handing back each block's mapped file pages once copied.

        A merge over tensor-parallel ranks then holds the merged tensor and a block of its shards,
        not both whole: one largest tensor less for a conversion, and for a verify whose other side
        holds a merged tensor of its own.
        """
        return cat_blockwise(pieces, dim, release_file_pages, self.arena.empty if self.arena is not None else None)

    def _check_shapes(self, shards: list[torch.Tensor], name: str, item: Item, stage: int) -> None:
        """Shards of one tensor must agree in shape and dtype (the merge copies them into one dtype)."""
        where = f"layer {item.layer} " if item.layer is not None else ""
        for what, values in (("shapes", [tuple(s.shape) for s in shards]), ("dtypes", [s.dtype for s in shards])):
            if len(set(values)) > 1:
                raise BadInputError(f"{where}'{name}' has different {what} across TP ranks: {values}",
                                    self.tree.files[RankKey(0, stage, 0)])

    def unconsumed(self) -> list[str]:
        """Weights in the source that no table entry read (tied-embedding copies excepted)."""
        left = []
        for rank in self.tree.files:
            for layer, name in self.tree.all_weight_names(rank):
                if (rank, layer, name) in self.consumed:
                    continue
                copy = (name == schema.OUTPUT_LAYER and self.arch.tie_embeddings) or (name == schema.EMBEDDING
                                                                                       and rank.pp > 0)
                if copy or name in self.left_out:
                    continue
                holder = self.tree.holders(rank, name, layer)[0]
                left.append(f"{holder}:{'' if layer is None else f'layer {layer} '}{name}")
        return left


class HFSource(_ReleasesReadPages):
    """Full Megatron-layout tensors built from a Hugging Face checkpoint's tensors."""

    def __init__(self, checkpoint: HFCheckpoint, family: FamilySpec, arch: ModelArch) -> None:
        super().__init__()
        self.checkpoint, self.family, self.arch = checkpoint, family, arch
        self.consumed: set[str] = set()
        self.left_out: set[str] = set()  # tensors the conversion was asked to leave out

    def full(self, item: Item, meta: bool) -> torch.Tensor:
        names = item_hf_names(self.family, item)
        tensors = [self.checkpoint.meta(n) for n in names] if meta else list(self.stored(item).values())
        for name in names:
            self.consumed.update(self.checkpoint.stored_names(name))
        if item.param.shared and not meta:
            main = main_hf_name(self.family, self.arch, item.param.megatron)
            check_shared_copy(names[0], tensors[0], main, self.checkpoint.tensor(main), self.checkpoint.path)
        return item.param.to_megatron(tensors, self.arch)

    def stored(self, item: Item) -> dict[str, torch.Tensor]:
        """An item's tensors under their Hugging Face names, as the checkpoint holds them (no repacking)."""
        self._next_item()
        tensors = {name: self.checkpoint.tensor(name) for name in item_hf_names(self.family, item)}
        self._read += self.checkpoint.read  # the stored tensors, not what an older layout's alias combined them into
        self.checkpoint.read.clear()
        return tensors

    def unconsumed(self) -> list[str]:
        ignored, unused = self.family.hf_ignored_suffixes, self.family.hf_unused
        return [n for n in self.checkpoint.names() if n not in self.consumed and n not in self.left_out
                and not n.endswith(ignored) and not (unused and unused(self.arch, n))]


class HFTarget:
    """Hugging Face tensors keyed by their names."""

    def __init__(self, family: FamilySpec, arch: ModelArch) -> None:
        self.family, self.arch = family, arch

    def emit(self, item: Item, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        names = item_hf_names(self.family, item)
        return list(zip(names, item.param.to_hf(full, self.arch)))


@dataclass(frozen=True)
class MegatronLayoutSpec:
    tp: int
    stages: tuple[int, ...]
    padded_vocab: int
    schema: str
    ep: int = 1
    grouped_gemm: bool = False  # experts as TEGroupedMLP (``mlp.experts.linear_fc1.weightJ``)


def param_parts(param: Param, arch: ModelArch) -> tuple[int, ...] | None:
    """The row counts of a ``PARTS_COLUMN`` tensor's fused parts (None for other styles)."""
    return param.parts(arch) if param.parts is not None else None


def layer_weights(family: FamilySpec, arch: ModelArch) -> dict[int, frozenset[str]]:
    """The canonical names of each layer's tensors: which linear layers Transformer Engine fuses norms into (a
    dense layer's pre-MLP norm into its fc1, an expert layer keeping a norm of its own; multi-latent attention's
    latent norms into its up projections)."""
    weights = {layer: frozenset(p.megatron for p in family.params_for(LAYER, arch, layer)) for layer in range(arch.num_layers)}
    for index in range(arch.mtp_num_layers):  # an MTP layer's transformer layer, of the last layer's kind
        weights[arch.num_layers + index] = weights[mtp_layer_kind(arch)]
    return weights


class MegatronTarget:
    """Tensor-parallel shards keyed by (rank, path inside the rank file's ``model`` dict)."""

    def __init__(self, family: FamilySpec, arch: ModelArch, layout: MegatronLayoutSpec) -> None:
        self.family, self.arch, self.layout = family, arch, layout
        self.layer_weights = layer_weights(family, arch)

    def emit(self, item: Item, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        if item.param.zero_in_megatron:
            _require_zero(full, item)
            return []
        if item.param.shared:  # the main model's embedding or output layer, written with it
            return []
        stages = list(self.layout.stages)
        prefix = self.family.megatron_prefix  # a multi-tower model's language model (towers name their own keys)
        stage, local = place(stages, item)
        if item.param.experts:
            out = []
            for expert, tensor in enumerate(full):
                ep, local_expert = expert_placement(expert, self.arch.num_experts, self.layout.ep)
                out += self._shards(item, tensor, stage, local, [ep], local_expert)
            return out
        if item.param.style is Style.VOCAB:
            full = pad_vocab(full, self.layout.padded_vocab)
        out = self._shards(item, full, stage, local, range(self.layout.ep), None)
        if item.param.megatron == schema.EMBEDDING and self.arch.tie_embeddings and len(stages) > 1:
            # the last stage holds a copy of each embedding shard for the tied output layer
            copy_path = prefixed(schema.stored_path(schema.OUTPUT_LAYER, None, self.layout.schema, tied_copy=True),
                                 prefix)
            out += [((RankKey(rank.tp, len(stages) - 1, rank.ep), copy_path), shard) for (rank, _), shard in out]
        if item.param.megatron == schema.EMBEDDING and self.arch.mtp_num_layers and len(stages) > 1:
            # megatron-core's MTP layers on the last stage embed with a copy of the embedding of their own
            out += [((RankKey(rank.tp, len(stages) - 1, rank.ep), path), shard) for (rank, path), shard in out
                    if rank.pp == 0 and path == (schema.EMBEDDING,)]
        return out

    def _shards(self, item: Item, full: torch.Tensor, stage: int, local: int | None, ep_ranks: Iterable[int],
                expert: int | None) -> list[tuple[Hashable, torch.Tensor]]:
        """Tensor-parallel shards of one tensor, placed in the rank files of every given EP rank."""
        if item.tower:
            path = (tower_stored_name(item, self.layout.schema == schema.MCORE_TE),)
        else:
            name = item.param.megatron.format(expert=expert)
            path = prefixed(schema.stored_path(name, local, self.layout.schema, grouped_experts=self.layout.grouped_gemm,
                                               layer_weights=self.layer_weights.get(item.layer, ())),
                            self.family.megatron_prefix)
        shards = split_for_tp(full, style_in_schema(item.param.style, self.layout.schema == schema.MCORE_TE),
                              self.layout.tp, param_parts(item.param, self.arch))
        return [((RankKey(t, stage, ep), path), s) for ep in ep_ranks for t, s in enumerate(shards)]


@dataclass(frozen=True)
class DistKey:
    """One torch_dist chunk of a global key: its offsets and the key's global shape."""

    fqn: str
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]


class TorchDistTarget:
    """Global tensors as torch_dist chunks: one chunk per layer (or, for layers stored apart, per layer key), one
    per tensor outside the layers.

    The engine's full tensors are already what torch_dist stores (un-split, fc1 as [all gate; all
    up], experts stacked); only the vocab is padded, for the tensor-parallel size training will use.
    """

    def __init__(self, family: FamilySpec, arch: ModelArch, padded_vocab: int, transformer_engine: bool) -> None:
        self.arch, self.padded_vocab, self.prefix = arch, padded_vocab, family.megatron_prefix
        # a hybrid model's layers differ in kind: megatron-core stores each apart, its norms under Transformer
        # Engine's names (MambaStack has only that spec; a local one maps its norm names there, as GPT's does)
        hybrid = arch.layer_pattern is not None
        self.layer_weights, self.transformer_engine = layer_weights(family, arch), transformer_engine or hybrid
        self.stacked = not (schema.layers_stored_apart(arch.moe_layers) or hybrid)

    def emit(self, item: Item, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        if item.param.zero_in_megatron:
            _require_zero(full, item)
            return []
        if item.param.shared:  # the main model's embedding or output layer: one key
            return []
        if item.param.style is Style.VOCAB:
            full = pad_vocab(full, self.padded_vocab)
        if item.tower:  # another tower's tensor: one key of its own, its layers stacked as megatron-core's blocks
            return self._tower_chunk(item, full)
        layer = None if item.group == MTP else item.layer  # an MTP layer's keys are global
        fqn = self.prefix + schema.torch_dist_key(item.param.megatron.format(expert=0), layer,
                                                  self.layer_weights.get(item.layer, ()), self.transformer_engine,
                                                  self.stacked)
        names = schema.NAMED_PARTS.get(item.param.megatron)
        if names:  # one key per part (megatron_schema.NAMED_PARTS)
            pieces = torch.split(full, list(param_parts(item.param, self.arch)), dim=0)
            return [entry for name, piece in zip(names, pieces) for entry in self._chunk(f"{fqn}.{name}", layer, piece)]
        return self._chunk(fqn, layer, full)

    def _tower_chunk(self, item: Item, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        """A tower tensor: whole, or on the layer axis of its stacked key when the tower's layers are megatron-core's
        (``vision_model.decoder.layers.<rel>``; norms named as the spec names them: Transformer Engine's fused, or
        the local spec's, which maps no names for a vision model)."""
        name = tower_stored_name(item, self.transformer_engine)
        stacked = TOWER_LAYER.match(name) if item.layer is not None else None
        if not stacked:
            return [(DistKey(name, (0,) * full.dim(), tuple(full.shape)), full)]
        key = DistKey(stacked.group(1) + stacked.group(2), (item.layer,) + (0,) * full.dim(),
                      (item.tower.num_layers(self.arch), *full.shape))
        return [(key, full.unsqueeze(0))]

    def _chunk(self, fqn: str, layer: int | None, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        """One key for ``full``: on the layer axis of a stacked key, unless it has no layer (an MTP layer's keys
        are global)."""
        if layer is None or not self.stacked:
            return [(DistKey(fqn, (0,) * full.dim(), tuple(full.shape)), full)]
        key = DistKey(fqn, (layer,) + (0,) * full.dim(), (self.arch.num_layers, *full.shape))
        return [(key, full.unsqueeze(0))]


TOWER_LAYER = re.compile(r"^(.+\.decoder\.layers\.)\d+\.(.+)$")  # a tower's megatron-core layer key


def prefixed(path: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """A megatron-core key under a multi-tower model's language-model prefix (none for a text model)."""
    return (prefix + path[0], *path[1:]) if prefix else path


def tower_stored_name(item: Item, transformer_engine: bool) -> str:
    """A tower tensor's key; a tower whose layers are megatron-core's (``decoder.layers.N.``) names its norms as
    the schema does (Transformer Engine fuses them into the next linear layer)."""
    tower = item.tower
    if item.layer is None or tower.megatron_layer_prefix != schema.LAYER_PREFIX + "{layer}." or not transformer_engine \
            or not tower.te_fused_norms:
        return megatron_name(item)
    weights = frozenset(p.megatron for p in tower.layer)
    return tower.megatron_prefix + schema.stored_path(item.param.megatron, item.layer, schema.MCORE_TE,
                                                      layer_weights=weights)[0]


def _require_zero(tensor: torch.Tensor, item: Item) -> None:
    if item.param.unused:  # never run by the Hugging Face model: left out whatever it holds
        return
    if tensor.device.type != "meta" and bool(tensor.any()):
        where = f"layer {item.layer} " if item.layer is not None else ""
        raise BadInputError(f"{where}'{item.param.hf[0]}' is not zero, and Megatron's architecture has no such tensor")


def run(items: Iterable[Item], source: Any, target: Any, meta: bool, dtype: torch.dtype | None,
        check_finite: bool = True,
        keep: Container[Hashable] | None = None) -> Iterator[tuple[Item, Hashable, torch.Tensor]]:
    """Produce every output tensor in order (with the item it came from); on ``meta`` tensors when planning.

    ``check_finite=False``: the caller checks the outputs (which hold every value of the full tensor).
    ``keep``: only the outputs with these keys (a process writing some of the files), none of the others cast.
    A target with an ``as_stored(key, tensor)`` turns each cast output into the outputs written (a quantizing target:
    a weight and its scales).
    """
    as_stored = getattr(target, "as_stored", None)
    for item in items:
        try:
            full = source.full(item, meta)
            outputs = target.emit(item, full)
        except RuntimeError as error:
            where = f"layer {item.layer} " if item.layer is not None else ""
            raise BadInputError(f"{where}'{item.param.megatron}' does not fit the architecture "
                                f"({reason(error, 160)})")
        if check_finite and not meta:
            warn_if_not_finite(full, item)
        for key, tensor in outputs:
            if keep is None or key in keep or as_stored is not None:
                tensor = cast(tensor, torch.float32 if item.param.float32 and dtype is not None else dtype)
                for key, tensor in as_stored(key, tensor) if as_stored is not None else [(key, tensor)]:
                    if keep is None or key in keep:
                        yield item, key, tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite: the minimum and maximum are (NaN propagates through both).

    ``aminmax`` reduces in place, without the full-size temporary a cast or ``isfinite`` would
    allocate (nor a flattening ``reshape``, a copy of a tensor that is not contiguous); with large
    allocations mapped fresh (see ``memory``), such temporaries cost page faults.
    """
    if tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize == 1:  # FP8 stored as it is: no aminmax kernel; checked in float32 blocks
        return all(all_finite(block.float()) for block in tensor.reshape(-1).split(1 << 22))
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def warn_if_not_finite(tensor: torch.Tensor, item: Item) -> None:
    """NaN/Inf weights are converted as they are, but the user should know. An FP8 output is the quantizer's, which
    refuses a block holding either (``hf_io.quantize_blocks``): not read again (that would cost more than quantizing)."""
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn or all_finite(tensor):
        return
    where = f"layer {item.layer} " if item.layer is not None else ""
    warnings.warn(f"{where}'{item.param.megatron}' contains NaN or Inf values")


def plan(items: list[Item], source: Any, target: Any, dtype: torch.dtype | None) -> list[tuple[Hashable, tuple, torch.dtype]]:
    """Every output's key, shape and dtype, in production order, computed on ``meta`` tensors."""
    return [entry[1:] for entry in plan_with_items(items, source, target, dtype)]


def plan_with_items(items: list[Item], source: Any, target: Any,
                    dtype: torch.dtype | None) -> list[tuple[Item, Hashable, tuple, torch.dtype]]:
    """:func:`plan`, each entry led by the item that produces it; refuses source tensors nothing reads."""
    planned = [(item, key, tuple(t.shape), t.dtype) for item, key, t in run(items, source, target, True, dtype)]
    left = source.unconsumed()
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise BadInputError(f"source tensors no conversion rule reads: {', '.join(left[:5])}{more}")
    return planned
