"""Test helpers: tiny random models, logits comparison, the CLI run in-process."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import _bootstrap  # noqa: E402,F401  (registers the families)
from checkpoint_convert.cli import run_convert_cli  # noqa: E402
from megatron_gpt2.reference_writer import randomize, reference_megatron_gpt2, tiny_gpt2  # noqa: E402,F401

TOKENS = torch.tensor([[3, 17, 250, 999, 42, 7, 512, 64, 1, 900, 33, 5], [8, 8, 120, 600, 2, 77, 13, 404, 0, 5, 6, 991]])


def logits_of(path_or_model, tokens: torch.Tensor = TOKENS, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(path_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=dtype)
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert expected.abs().mean() > 0.1, "reference logits are too small to detect mapping bugs"
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max logits difference {diff} > {atol}"


def convert(*argv: str) -> int:
    """Run the convert CLI in-process (quiet) and return its exit code."""
    return run_convert_cli([*map(str, argv), "--quiet"], _bootstrap.FAMILIES)


