"""Multi-tower models: a vision encoder, a merger / projector and a language model, each its own key table.

A text model is one tower, the language model: its family's table (``FamilySpec.first_stage``, ``layer``,
``last_stage``), its layers in the core's Megatron schemas (``decoder.layers.N``), its names under
``FamilySpec.megatron_prefix`` in the Megatron layout (empty for Megatron-LM GPT models; Megatron-Bridge's
vision-language models keep it under ``language_model.``). Every other tower is a :class:`Tower`: tables of
the same :class:`~checkpoint_convert.family.Param` entries, its own layer count (read from the architecture),
and the prefixes that place its names on each side. The walk (``engine.walk``) visits the other towers first,
in the order the model runs them, then the language model; targets and sources ask :func:`hf_names` and
:func:`megatron_name` where the names go. The core never names a tower's family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .arch import ModelArch
from .family import Param


def no_layers(arch: ModelArch) -> int:
    return 0


@dataclass(frozen=True)
class Tower:
    """One tower other than the language model (a vision encoder, a merger).

    ``first`` / ``layer`` / ``last``: its entries before, in each of and after its ``num_layers(arch)`` layers;
    ``Param.hf`` is relative to ``hf_prefix`` (``hf_prefix + hf_layer_prefix`` in a layer), ``Param.megatron``
    to ``megatron_prefix`` (``megatron_prefix + megatron_layer_prefix`` in a layer). Its tensors are stored
    whole, one key each (Megatron-Bridge keeps the vision tower as Hugging Face's module: replicated, one key
    per layer's tensor), on the first pipeline stage.
    """

    name: str
    hf_prefix: str
    megatron_prefix: str
    first: tuple[Param, ...] = ()
    layer: tuple[Param, ...] = ()
    last: tuple[Param, ...] = ()
    num_layers: Callable[[ModelArch], int] = no_layers
    hf_layer_prefix: str = ""  # format string with {layer}
    megatron_layer_prefix: str = ""  # format string with {layer}

    def params_for(self, group: str, arch: ModelArch) -> list[Param]:
        table = {"first": self.first, "layer": self.layer, "last": self.last}[group]
        return [param for param in table if param.when(arch)]

    def hf_names(self, param: Param, layer: int | None) -> list[str]:
        prefix = self.hf_prefix + (self.hf_layer_prefix.format(layer=layer) if layer is not None else "")
        return [prefix + name for name in param.hf]

    def megatron_name(self, param: Param, layer: int | None) -> str:
        prefix = self.megatron_prefix + (self.megatron_layer_prefix.format(layer=layer) if layer is not None else "")
        return prefix + param.megatron
