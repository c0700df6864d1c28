"""FP8 block-quantized Hugging Face output (``--hf_quantization fp8_block``), as DeepSeek-V3 and Qwen3's FP8
releases ship their weights and transformers' fine-grained FP8 loader reads them.

Which tensors are FP8 is transformers' own answer, not a list kept here: the transformers model of the output's
config is built on ``meta`` and handed to transformers' fine-grained FP8 quantizer, which swaps every
``nn.Linear`` (``FP8Linear``) and every fused experts module (``FP8Experts``) it would load as FP8 and gives each a
``*_scale_inv`` parameter. Those weights are written as ``float8_e4m3fn`` with a float32 ``weight_scale_inv``
per block (``hf_io.quantize_blocks``); everything else keeps its dtype: embeddings, norms, routers (custom modules,
not ``nn.Linear``), biases and the output layer (the quantizer's default skip). Linear gates (Qwen2-MoE's
``shared_expert_gate``) are left out too, and then listed in ``modules_to_not_convert`` with the output layer.

Experts: transformers 5.25 dequantizes on a CPU (``Fp8Dequantize``) only per-expert tensors with their scales,
merged by the model's conversion mapping; fused 3-D experts with ``gate_up_proj_scale_inv`` are loaded as raw FP8
(measured). So fused expert tensors are written per expert under the names that mapping reads and save_pretrained
writes (``mlp.experts.E.gate_proj.weight``, ...; Mixtral's ``block_sparse_moe.experts.E.w1.weight``), which is also
how DeepSeek-V3 and Qwen3-MoE FP8 checkpoints store them.

Layer: engine (an output target wrapping the Hugging Face one); the quantizer itself is ``hf_io``'s, beside its
dequantizer.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from ..base.errors import BadInputError
from .hf_io import SCALE_SUFFIX, block_grid, quantize_blocks

FP8_BLOCK = "fp8_block"
HF_QUANTIZATIONS = (FP8_BLOCK,)
DEFAULT_BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3-FP8's weight_block_size
_EXPERT_PATTERN = re.compile(r"^[\w.]*\*[\w.]*$")


def quantization_config(block: tuple[int, int], not_converted: tuple[str, ...]) -> dict[str, Any]:
    """config.json's ``quantization_config``: the four keys DeepSeek-V3's and Qwen3-8B-FP8's carry, and the
    modules left unquantized only when transformers' default (the output layer) is not all of them."""
    config: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": list(block)}
    if not_converted:
        config["modules_to_not_convert"] = list(not_converted)
    return config


@dataclass
class FP8Layout:
    """What an FP8 output stores as FP8: ``quantized`` output names (fused expert tensors by their fused names),
    and for each fused expert tensor the per-expert name templates (``{expert}``) of its chunks along rows."""

    block: tuple[int, int]
    quantized: frozenset[str]
    experts: dict[str, tuple[str, ...]]
    not_converted: tuple[str, ...] = ()
    split: set[str] = field(default_factory=set)  # per-expert names produced so far (all quantized)
    uneven: list[str] = field(default_factory=list)  # planned weights with a side longer than a block, not a multiple

    @property
    def config(self) -> dict[str, Any]:
        return quantization_config(self.block, self.not_converted)


def fp8_layout(model: Any, block: tuple[int, int]) -> FP8Layout:
    """The FP8 layout transformers' fine-grained FP8 loader expects for ``model`` (the output's transformers model,
    parameters on ``meta``; its modules are swapped here); refuses a model it quantizes nothing of (GPT-2, whose
    layers are ``Conv1D``) in one line."""
    from transformers import FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    experts, renamings = _per_expert_names(model)
    gates = _linear_gates(model)
    not_converted = tuple(_default_skips(model) + gates) if gates else ()
    quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=block,
                                                               modules_to_not_convert=list(not_converted) or None),
                                          pre_quantized=True)
    quantizer._process_model_before_weight_loading(model)  # what from_pretrained does before loading weights
    quantized = frozenset(name[:-len(SCALE_SUFFIX)] for name, _ in model.named_parameters()
                          if name.endswith(SCALE_SUFFIX))
    if not quantized:
        kinds = sorted({type(module).__name__ for name, module in model.named_modules() if ".layers." in name or
                        ".h." in name} & {"Conv1D"})
        raise BadInputError(f"--hf_quantization {FP8_BLOCK}: transformers' fine-grained FP8 loader quantizes no layer "
                            f"of {type(model).__name__}" + (f" (its linear layers are {kinds[0]})" if kinds else ""))
    fused = {name: _templates(name, experts, renamings, type(model).__name__)
             for name in quantized if not name.endswith(".weight")}
    return FP8Layout(block, quantized, fused, not_converted)


def _default_skips(model: Any) -> list[str]:
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted(get_keys_to_not_convert(model))


def _linear_gates(model: Any) -> list[str]:
    """``nn.Linear`` gates (a shared expert's sigmoid gate): routing weights, kept unquantized as routers are;
    named by their last two components, which transformers matches as a suffix."""
    return sorted({".".join(name.split(".")[-2:]) for name, module in model.named_modules()
                   if type(module) is torch.nn.Linear and name.split(".")[-1].endswith("gate")})


def _plain(pattern: str) -> str:
    return pattern.replace("\\.", ".")


def _per_expert_names(model: Any) -> tuple[dict[str, list[str]], list[Any]]:
    """{fused experts target (``mlp.experts.gate_up_proj``): the per-expert source patterns transformers' conversion
    mapping merges into it (``mlp.experts.*.gate_proj.weight``, ``mlp.experts.*.up_proj.weight``)}, and the mapping's
    renamings reversed (Mixtral's ``.mlp.`` -> ``.block_sparse_moe.``), which save_pretrained applies too."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    found: dict[str, list[str]] = {}
    mapping = get_model_conversion_mapping(model)
    renamings = [rename.reverse_transform() for rename in mapping if type(rename) is WeightRenaming][::-1]
    for converter in mapping:
        if not isinstance(converter, WeightConverter) or len(converter._original_target_patterns) != 1:
            continue
        target = _plain(converter._original_target_patterns[0])
        sources = [_plain(source) for source in converter._original_source_patterns]
        if ".experts." in f".{target}" and all(_EXPERT_PATTERN.match(source) for source in sources + ["*" + target]):
            found[target] = sources
    return found, renamings


def _templates(name: str, experts: dict[str, list[str]], renamings: list[Any], model_class: str) -> tuple[str, ...]:
    """The per-expert names (``{expert}`` templates) a fused expert tensor is written under: the names transformers'
    save_pretrained gives them (and the older layouts our families read)."""
    for target, sources in experts.items():
        if name.endswith(target) and len(sources) in (1, 2):
            prefix = name[:-len(target)]
            return tuple(_renamed(prefix + source.replace("*", "{expert}"), renamings) for source in sources)
    raise BadInputError(f"--hf_quantization {FP8_BLOCK}: transformers reads FP8 experts of {model_class} only per "
                        f"expert, and its conversion mapping names no per-expert tensors for '{name}'")


def _renamed(name: str, renamings: list[Any]) -> str:
    for rename in renamings:
        name, _ = rename.rename_source_key(name)
    return name


class FP8Target:
    """A Hugging Face target whose outputs transformers loads as FP8 are written block-quantized.

    ``emit`` writes fused expert tensors per expert; the engine casts each output, then ``as_stored`` quantizes the
    ones stored as FP8 into (``float8_e4m3fn`` weight, ``weight_scale_inv``): each tensor is quantized as it is
    written, one at a time, with float32 work of a run of block rows (see ``quantize_blocks``).
    """

    def __init__(self, inner: Any, layout: FP8Layout) -> None:
        self.inner, self.layout = inner, layout

    def emit(self, item: Any, full: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        out = []
        for key, tensor in self.inner.emit(item, full):
            templates = self.layout.experts.get(key)
            if templates is None:
                out.append((key, tensor))
                continue
            for expert, weights in enumerate(tensor):
                for template, part in zip(templates, weights.chunk(len(templates))):
                    self.layout.split.add(template.format(expert=expert))
                    out.append((template.format(expert=expert), part))
        return out

    def as_stored(self, key: Hashable, tensor: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
        """``[(key, tensor)]``, or for a weight stored as FP8 ``[(key, FP8 weight), (key_scale_inv, scales)]``."""
        if key not in self.layout.quantized and key not in self.layout.split:
            return [(key, tensor)]
        if tensor.device.type == "meta":
            grid = block_grid(tensor.shape, self.layout.block)
            if any(size > edge and size % edge for size, edge in zip(tensor.shape, self.layout.block)):
                self.layout.uneven.append(str(key))
            return [(key, torch.empty(tensor.shape, dtype=torch.float8_e4m3fn, device="meta")),
                    (key + SCALE_SUFFIX, torch.empty(grid, dtype=torch.float32, device="meta"))]
        weight, scales = quantize_blocks(tensor, self.layout.block, str(key))
        return [(key, weight), (key + SCALE_SUFFIX, scales)]


def warn_if_transformers_misreads(layout: FP8Layout) -> None:
    """transformers 5.25's CPU dequantization (``Fp8Dequantize._dequantize_one``) takes the block to be the weight's
    side divided by the scale grid's: a side longer than a block that is no multiple of it (DeepSeek-V3's 576
    kv_a_proj_with_mqa rows) is refused there, or read with the wrong blocks (200 rows: blocks of 100). The format,
    our reader, transformers' GPU path (FP8Linear, given weight_block_size) read it as written."""
    if layout.uneven:
        more = f" and {len(layout.uneven) - 1} more" if len(layout.uneven) > 1 else ""
        warnings.warn(f"'{layout.uneven[0]}'{more} end in partial {layout.block[0]} x {layout.block[1]} blocks after "
                      "whole ones, which transformers' CPU dequantization (dequantize=True) misreads; its GPU FP8 "
                      "layers and this tool read them")


def block_size(text: str) -> tuple[int, int]:
    """``--fp8_block_size``: ``R,C`` (or one number for square blocks), positive whole numbers."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"'{text}' is not a block size R,C of two whole numbers of at least 1")
    return sizes  # type: ignore[return-value]
