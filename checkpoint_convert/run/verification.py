"""Prove two checkpoints hold the same model, whatever their formats and layouts.

Both are mapped to the canonical Hugging Face tensor names by the conversion engine itself (a
Megatron side merged over ranks, vocab padding trimmed; a Hugging Face side as stored) and compared
one family-table entry at a time, in bounded blocks (see ``blockwise``): memory holds one entry's
tensors of each side, and of those only the copies a merge or unpacking made, as file pages are
handed back block by block once compared. With logits,
both Hugging Face models are built from those tensors (fp32, the whole model in memory) and run on
the same token ids.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..base.errors import BadInputError, reason
from ..base.memory import Arena, release_file_pages
from ..engine.blockwise import max_abs_diff
from ..engine.mtp import not_in_transformers_model
from ..engine.sources import Source, misread
from ..engine.streams import HFTarget, Item, plan_with_items, run, walk
from .converter import hf_config_of, hf_model_from_config


def hf_tensors(source: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under its Hugging Face name, in the family table's order."""
    items = walk(source.family, source.arch)
    for _, name, tensor in run(items, source.tensors, HFTarget(source.family, source.arch), False, None):
        yield name, tensor
    source.tensors.release()


def named_items(source: Source) -> dict[str, Item]:
    """Every Hugging Face name, in the family table's order, with the entry that produces it (planned on meta); a
    tensor the Hugging Face model never runs (``Param.unused``) has no Megatron counterpart to compare."""
    items = walk(source.family, source.arch)
    planned = plan_with_items(items, source.tensors, HFTarget(source.family, source.arch), None)
    return {name: item for item, name, _, _ in planned if not item.param.unused}


def item_tensors(source: Source, item: Item) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of one family-table entry.

    A Hugging Face source gives its stored tensors as they are (a conversion to Hugging Face would
    write them back unchanged), not repacked into Megatron's layout and split again: no copies, and
    a bug in a layout transform cannot cancel itself out on both sides. The source's mapped pages
    are handed back at once: a merge already copied what it read, and the pages of a tensor that is
    a view of its file come back from the page cache as it is compared.
    """
    if source.kind == "hf":
        tensors = source.tensors.stored(item)
    else:
        target = HFTarget(source.family, source.arch)
        tensors = {name: tensor for _, name, tensor in run([item], source.tensors, target, False, None, False)}
    source.tensors.release()
    return tensors


@dataclass
class Comparison:
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    diffs: dict[str, float] = field(default_factory=dict)  # name -> max abs diff
    shapes: dict[str, tuple] = field(default_factory=dict)  # name -> (shape in A, shape in B) where they differ
    logits_diff: float | None = None

    def differing(self, atol: float) -> list[str]:
        return [name for name, diff in self.diffs.items() if not diff <= atol]

    def equal(self, atol: float) -> bool:
        logits_ok = self.logits_diff is None or self.logits_diff <= atol
        return not (self.only_in_a or self.only_in_b or self.differing(atol)) and logits_ok

    def record(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Compare one tensor of A with B's, handing back the file pages of each block once compared."""
        self.diffs[name] = max_abs_diff(a, b, after_block=release_file_pages)
        if a.shape != b.shape:
            self.shapes[name] = (tuple(a.shape), tuple(b.shape))


class _OneEntryAtATime:
    """B's tensors, produced one family-table entry at a time as A asks for them by name.

    It holds the tensors of B's current entry that A has not compared yet, never more: when A walks
    the same table (the same family), B's entries come in the same order and each is produced once;
    otherwise an entry may be produced again, but memory stays bounded.
    """

    def __init__(self, source: Source, items: dict[str, Item], wanted: set[str]) -> None:
        self.source, self.items, self.wanted = source, items, wanted
        self.held: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.held:
            self.held = {}  # dropped before the next entry is produced
            produced = item_tensors(self.source, self.items[name])
            self.held = {other: tensor for other, tensor in produced.items() if other in self.wanted}
        return self.held.pop(name)


def compare_tensors(a: Source, b: Source) -> Comparison:
    """Walk A's family table; each entry's tensors are compared with B's of the same names as they are produced.

    Each side is done with an entry's tensors before it makes the next, so a Megatron side merges
    into memory reused from entry to entry (``memory.Arena``).
    """
    items_a, items_b = named_items(a), named_items(b)
    result = Comparison(only_in_a=[name for name in items_a if name not in items_b],
                        only_in_b=[name for name in items_b if name not in items_a])
    others = _OneEntryAtATime(b, items_b, set(items_a))
    merging = [source.tensors for source in (a, b) if source.kind == "megatron"]
    for tensors in merging:
        tensors.arena = Arena()
    try:
        previous = None
        for name, item in items_a.items():
            if name in items_b and item is not previous:
                _compare_entry(result, a, item, others)
                previous = item
    finally:
        for tensors in merging:
            tensors.arena = None
    return result


def _compare_entry(result: Comparison, a: Source, item: Item, others: _OneEntryAtATime) -> None:
    """One entry of A against B; its tensors go when this returns, before A's next entry is produced."""
    for name, tensor in item_tensors(a, item).items():
        if name in others.items:
            result.record(name, tensor, others.take(name))


def compare_checkpoints(open_source: Callable[[str, ThreadPoolExecutor | None], Source], a: str, b: str,
                        logits: bool = False) -> Comparison:
    """Open two checkpoints (``open_source(path, speculate)``) and compare them; with ``logits``, their logits too.

    As in a conversion, a Hugging Face side's architecture is read from config.json's values as
    written, and transformers' config class (seconds of imports) reads them again on another thread
    while the tensors are compared; should it read another model, the comparison starts over with
    its reading.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="hf-config") as pool:
        first = [open_source(path, pool) for path in (a, b)]
        try:
            comparison = compare_tensors(*first)
            for source in first:
                if source.arch_check is not None:
                    source.arch_check.result()
            sources = first
        except BaseException as error:
            if not any(misread(source, error) for source in first):
                raise
            # ``first`` stays referenced: its mappings, registered read-only in this scope, stay mapped
            sources = [open_source(path, None) for path in (a, b)]
            comparison = compare_tensors(*sources)
    if logits:
        comparison.logits_diff = compare_logits(*sources)
    return comparison


def hf_model(source: Source) -> torch.nn.Module:
    """The transformers model the source describes, holding the source's weights in fp32."""
    config = hf_config_of(source.family, source.arch.replace(params_dtype=torch.float32), source.numbers_file)
    model = hf_model_from_config(config, source.numbers_file, dtype=torch.float32)
    state = {name: tensor.to(torch.float32, copy=True) for name, tensor in hf_tensors(source)
             if not not_in_transformers_model(source.family, source.arch, name)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape than the model's (a tower's are not checked before)
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), reason(error))
        raise BadInputError(f"the tensors do not fit the model the architecture describes ({mismatch})",
                            source.numbers_file) from None
    model.tie_weights()
    untied_missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if untied_missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {untied_missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def fixed_tokens(vocab_size: int, count: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, count), generator=generator)


def compare_logits(a: Source, b: Source) -> float:
    """The largest difference of the two models' logits on fixed tokens; each source's architecture is first
    checked against its tensors (as a conversion checks it), so that a model is built only from weights that fit."""
    for source in (a, b):
        source.check_against_tensors()
    inputs = _shared_inputs(a, b)
    return max_abs_diff(_logits(a, inputs), _logits(b, inputs))


def _shared_inputs(a: Source, b: Source) -> dict[str, torch.Tensor]:
    """The fixed input both models are fed: token ids, or the family's own (an image and text); refused when the
    two models would take different ones (their image token ids differ): their logits cannot be compared."""
    if a.family.logits_inputs is None:
        return {"input_ids": fixed_tokens(min(a.arch.vocab_size, b.arch.vocab_size))}
    inputs = a.family.logits_inputs(a.arch)
    other = b.family.logits_inputs(b.arch) if b.family.logits_inputs else {}
    differing = [name for name, tensor in inputs.items()
                 if name not in other or other[name].shape != tensor.shape or not torch.equal(other[name], tensor)]
    if differing:
        raise BadInputError(f"the two models take different fixed inputs ({', '.join(differing)} differ: other "
                            "special token ids or vision settings), so their logits cannot be compared", b.numbers_file)
    return inputs


def _logits(source: Source, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``inputs``; a model transformers builds but cannot run on them (a config whose values
    contradict each other) is bad input naming the source."""
    model = hf_model(source)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    except (ArithmeticError, ValueError, IndexError, RuntimeError) as error:
        raise BadInputError(f"transformers cannot run the model it describes on a fixed input ({reason(error)})",
                            source.numbers_file) from None
