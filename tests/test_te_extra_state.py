"""Transformer Engine's ``_extra_state`` of norms in ``torch_dist`` output (rank files: the family kit's ``te_tp1``
runs). megatron-core's Transformer Engine spec builds ``final_layernorm``, q/k norms, a MoE layer's
``pre_mlp_layernorm`` and MLA's ``input_layernorm`` as ``TENorm`` (TE's ``LayerNorm`` / ``RMSNorm``), which from TE
1.13 on carry an ``_extra_state``, so its ``dist_checkpointing.load`` asks for an object of each. megatron-core (in
``tests/megatron_oracle.py``) loads our output into a GPTModel whose norms are given that behaviour
(``_TENormStandIn``), every key it asks for must be there, and computes the original's logits."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from checkpoint_convert.formats.torch_dist import read_metadata
from tests.family_kit import VARIANTS
from tests.helpers import TOKENS, assert_logits_close, convert, logits_of
from tests.test_family_kit import MEGATRON_CORE_ATOL, ORACLE

# q/k norms and the final norm. The oracle builds megatron-core's local spec, whose torch_dist names for a MoE layer's
# pre-MLP norm and MLA's q/kv norms are the local ones, not Transformer Engine's (fused): those norms' extra state is
# loaded from rank files only (the family kit's te_tp1 runs, Qwen3-MoE and DeepSeek among them)
NAMES = ("qwen3_gqa",)


def test_megatron_core_loads_te_norm_extra_state_from_torch_dist(tmp_path):
    variants = {variant.name: variant for variant in VARIANTS if variant.name in NAMES}
    logits, jobs = {}, []
    torch.save(TOKENS, tmp_path / "tokens.pt")
    for name, variant in variants.items():
        logits[name] = logits_of(variant.build(tmp_path / name / "hf"))
        assert convert("--load_path", tmp_path / name / "hf", "--save_path", tmp_path / name / "dist", "--to",
                       "megatron", "--megatron_ckpt_format", "torch_dist") == 0
        jobs.append(dict(kind="dist-logits", name=name, ckpt=str(tmp_path / name / "dist"),
                         tokens=str(tmp_path / "tokens.pt"), out=str(tmp_path / f"{name}.pt"), tp=1))
    stored = set(read_metadata(tmp_path / NAMES[0] / "dist" / "release").state_dict_metadata)
    assert {"decoder.final_layernorm._extra_state/shard_0_1",  # as megatron-core names its objects
            "decoder.layers.self_attention.k_layernorm._extra_state/shard_3_4"} <= stored
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ORACLE), "batch", tmp_path / "jobs.json", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in variants:
        assert_logits_close(torch.load(tmp_path / f"{name}.pt"), logits[name], atol=MEGATRON_CORE_ATOL)
