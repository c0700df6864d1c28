"""Prove two checkpoints hold the same model, whatever their formats and layouts.

Both are mapped to the canonical Hugging Face tensor names by the conversion engine itself (merged
over ranks, vocab padding trimmed) and compared tensor by tensor as they stream, so memory holds a
few tensors at a time. With logits, both Hugging Face models are built from those tensors (fp32, the
whole model in memory) and run on the same token ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Iterator

import torch

from .converter import Source
from .engine import HFTarget, max_abs_diff, plan, run, walk


def hf_tensors(source: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under its Hugging Face name, in the family table's order."""
    items = walk(source.family, source.arch)
    for _, name, tensor in run(items, source.tensors, HFTarget(source.family, source.arch), False, None):
        yield name, tensor
    source.tensors.release()


def hf_names(source: Source) -> list[str]:
    items = walk(source.family, source.arch)
    return [name for name, _, _ in plan(items, source.tensors, HFTarget(source.family, source.arch), None)]


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


def compare_tensors(a: Source, b: Source) -> Comparison:
    """Stream both sources in step; tensors are compared as soon as both sides have produced them."""
    names_a, names_b = hf_names(a), hf_names(b)
    common = set(names_a) & set(names_b)
    result = Comparison(only_in_a=[n for n in names_a if n not in common],
                        only_in_b=[n for n in names_b if n not in common])
    pending_a: dict[str, torch.Tensor] = {}
    pending_b: dict[str, torch.Tensor] = {}
    for (name_a, tensor_a), (name_b, tensor_b) in zip_longest(hf_tensors(a), hf_tensors(b), fillvalue=(None, None)):
        if name_a in common:
            pending_a[name_a] = tensor_a
        if name_b in common:
            pending_b[name_b] = tensor_b
        for name in [n for n in pending_a if n in pending_b]:
            left, right = pending_a.pop(name), pending_b.pop(name)
            result.diffs[name] = max_abs_diff(left, right)
            if left.shape != right.shape:
                result.shapes[name] = (tuple(left.shape), tuple(right.shape))
    return result


def hf_model(source: Source) -> torch.nn.Module:
    """The transformers model the source describes, holding the source's weights in fp32."""
    from transformers import AutoModelForCausalLM

    config = source.family.hf_config_from_arch(source.arch.replace(params_dtype=torch.float32))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.float().clone() for name, tensor in hf_tensors(source)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    untied_missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if untied_missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {untied_missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def fixed_tokens(vocab_size: int, count: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, count), generator=generator)


def compare_logits(a: Source, b: Source) -> float:
    tokens = fixed_tokens(min(a.arch.vocab_size, b.arch.vocab_size))
    with torch.no_grad():
        logits_a = hf_model(a)(tokens).logits
        logits_b = hf_model(b)(tokens).logits
    return max_abs_diff(logits_a, logits_b)
