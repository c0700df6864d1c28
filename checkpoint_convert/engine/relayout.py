"""Reading a multi-tower model stored in one Megatron layout through another layout's tables.

Megatron-Bridge keeps the vision tower as Hugging Face stores it, MindSpeed-MM in megatron-core form: their tables
group the same Hugging Face tensors into different Megatron tensors, so an item of one has no single counterpart in
the other. Both name the same Hugging Face tensors, though: the source is read as those (each from its item's full
tensor through the source table's ``to_hf``, one item at a time, as a conversion to Hugging Face would), and the
target's table builds its tensors from them (``HFSource``), without writing a Hugging Face copy.
"""
from __future__ import annotations

from typing import Any

import torch

from ..model.arch import ModelArch
from ..model.family import FamilySpec
from .streams import HFSource, Item, item_hf_names, walk


class HFNamesView:
    """A Megatron source's tensors under their Hugging Face names (what ``HFSource`` reads a checkpoint through)."""

    def __init__(self, tensors: Any, family: FamilySpec, arch: ModelArch) -> None:
        self.tensors, self.family, self.arch = tensors, family, arch
        self.path = tensors.tree.iter_dir
        self.read: list[torch.Tensor] = []  # the wrapped source hands its own pages back
        self._item_of = {name: item for item in walk(family, arch) for name in item_hf_names(family, item)}
        self._meta: dict[str, torch.Tensor] = {}
        self._parts: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return list(self._item_of)

    def stored_names(self, name: str) -> list[str]:
        return [name]

    def _converted(self, item: Item, meta: bool) -> dict[str, torch.Tensor]:
        full = self.tensors.full(item, meta)
        return dict(zip(item_hf_names(self.family, item), item.param.to_hf(full, self.arch)))

    def meta(self, name: str) -> torch.Tensor:
        if name not in self._meta:
            self._meta.update(self._converted(self._item_of[name], True))
        return self._meta[name]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor, from its item's full tensor (kept until a tensor of another item is asked for)."""
        if name not in self._parts:
            self._parts = self._converted(self._item_of[name], False)
        return self._parts[name]


class ThroughHFNames(HFSource):
    """``HFSource`` over :class:`HFNamesView`; tensors the wrapped source never read are reported as its own."""

    def __init__(self, view: HFNamesView, family: FamilySpec, arch: ModelArch) -> None:
        super().__init__(view, family, arch)  # type: ignore[arg-type]  (the view answers what HFSource asks)
        self.view = view

    def unconsumed(self) -> list[str]:
        return super().unconsumed() + self.view.tensors.unconsumed()


def read_in_layout(source: Any, family: FamilySpec) -> None:
    """Read ``source`` (a Megatron source) through ``family``'s tables from now on; its tensors stay where they are
    (one read through a third layout's tables already is read from its stored tensors, not through both)."""
    through = isinstance(source.tensors, ThroughHFNames)
    view = source.tensors.view if through else HFNamesView(source.tensors, source.family, source.arch)
    tensors = ThroughHFNames(view, family, source.arch)
    tensors.left_out = source.tensors.left_out
    source.family, source.tensors = family, tensors


def read_through(source: Any, family: FamilySpec) -> None:
    """Read ``source`` through ``family``'s tables from now on: a Hugging Face source by its names, a Megatron one
    through the Hugging Face tensors both tables name (:func:`read_in_layout`)."""
    if source.kind == "megatron":
        read_in_layout(source, family)
        return
    tensors = HFSource(source.reader, family, source.arch)
    tensors.left_out = source.tensors.left_out
    source.family, source.tensors = family, tensors
