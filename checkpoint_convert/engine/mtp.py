"""Multi-token prediction (MTP) layers, as megatron-core holds them (layer ``model`` of the core: family tables
and their placement).

megatron-core keeps MTP layer ``i`` on the last pipeline stage as ``mtp.layers.i.``: its own norms and projection
(``enorm``, ``hnorm``, ``eh_proj``, ``final_layernorm``; the family's ``FamilySpec.mtp_head`` says what Hugging
Face calls them) and one transformer layer under ``transformer_layer.`` (named as a decoder layer, with the
decoder's last layer's kind: megatron-core builds it from that layer's spec). It shares the main model's
embedding and output layer, which Hugging Face stores again in the MTP layer: the family marks those entries
``shared``; they are written from the main tensors and, read, must equal them.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ..base.errors import BadInputError
from ..formats.megatron_schema import MTP_TRANSFORMER_LAYER
from ..model.arch import ModelArch
from ..model.family import FamilySpec, Param


def mtp_prefix(index: int) -> str:
    return f"mtp.layers.{index}."


def mtp_layer_kind(arch: ModelArch) -> int:
    """The decoder layer whose kind (dense or experts) the MTP layers take: the last one."""
    return arch.num_layers - 1


def mtp_layer_params(family: FamilySpec, arch: ModelArch, index: int) -> list[Param]:
    """The table entries of MTP layer ``index`` with global Megatron names (shared entries keep the main
    tensor's name); Hugging Face names stay relative to the layer prefix of layer ``num_layers + index``."""
    prefix = mtp_prefix(index)
    head = [param if param.shared else dataclasses.replace(param, megatron=prefix + param.megatron)
            for param in family.mtp_head if param.when(arch)]
    layer = [dataclasses.replace(param, megatron=prefix + MTP_TRANSFORMER_LAYER + param.megatron)
             for param in family.params_for("layer", arch, mtp_layer_kind(arch))]
    return head + layer


def not_in_transformers_model(family: FamilySpec, arch: ModelArch, hf_name: str) -> bool:
    """A Hugging Face tensor of a multi-token prediction layer: transformers' models have no such layer (they skip
    its tensors on load), so neither their configs' checks nor their logits involve it."""
    return bool(arch.mtp_num_layers) and family.hf_mtp_tensor is not None and family.hf_mtp_tensor(arch, hf_name)


def main_hf_name(family: FamilySpec, arch: ModelArch, megatron: str) -> str:
    """The Hugging Face name of the main model's tensor a shared MTP entry copies."""
    for group in ("first", "last"):
        for param in family.params_for(group, arch):
            if param.megatron == megatron:
                return param.hf[0]
    raise BadInputError(f"the {family.name} table has no main tensor '{megatron}' for its MTP layers to share")


def check_shared_copy(name: str, copy: torch.Tensor, main_name: str, main: torch.Tensor, file: Path | None) -> None:
    """An MTP layer's copy of the embedding or output layer must be the main model's: one is converted."""
    if copy.shape != main.shape or not torch.equal(copy, main.to(copy.dtype)):
        raise BadInputError(f"'{name}' differs from '{main_name}': a multi-token prediction layer shares the main "
                            "model's embedding and output layer, so its copy must equal them", file)


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def hf_mtp_layer_count(arch: ModelArch, names: list[str], file: Path | None) -> int:
    """How many MTP layers a Hugging Face checkpoint holds: its decoder layers from ``num_hidden_layers`` on
    (transformers itself saves none; DeepSeek's and GLM's releases hold ``num_nextn_predict_layers``)."""
    found = sorted({int(match.group(1)) for name in names if (match := _HF_LAYER.match(name))
                    and int(match.group(1)) >= arch.num_layers})
    if found != list(range(arch.num_layers, arch.num_layers + len(found))):
        raise BadInputError(f"multi-token prediction layers {found} do not follow the {arch.num_layers} decoder "
                            "layers one after another", file)
    return len(found)
