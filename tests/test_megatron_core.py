"""Our Megatron output is right only if megatron-core itself computes the same function from it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.family_kit import VARIANTS
from tests.helpers import TOKENS, as_virtual_pipeline, assert_logits_close, convert, logits_of, tiny_gpt2
from tests.test_llama import tiny_llama

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -r requirements-dev.txt)")

ORACLE = Path(__file__).with_name("megatron_oracle.py")
ATOL = 2e-5


def run_oracle(*argv) -> None:
    result = subprocess.run([sys.executable, str(ORACLE), *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def megatron_core_logits(checkpoint: Path, tmp_path: Path, tp: int = 1, ep: int = 1) -> torch.Tensor:
    torch.save(TOKENS, tmp_path / "tokens.pt")
    run_oracle("logits", checkpoint, tmp_path / "tokens.pt", tmp_path / "logits.pt", tp, ep)
    return torch.load(tmp_path / "logits.pt")


# every family and variant runs through megatron-core in the family kit (test_family_kit.py); these
# tests cover pipeline shapes and reshapes on a few of the kit's models
MODELS = {variant.name: variant.build for variant in VARIANTS
          if variant.name in ("gpt2_tied", "llama_gqa_untied", "mixtral")}


def test_reshaped_megatron_runs_in_megatron_core(tmp_path):
    """TP2 PP2 -> TP1 PP1 reshape, then megatron-core: proves merge and stage stitching."""
    model = tiny_llama(tmp_path / "hf", rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "a", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "a", "--save_path", tmp_path / "b", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "1",
                   "--transformer_impl", "local") == 0
    assert_logits_close(megatron_core_logits(tmp_path / "b", tmp_path), logits_of(model), atol=ATOL)


PIPELINES = {
    "pp2_uneven_1_3": ["--target_pipeline_model_parallel_size", "2", "--target_pipeline_layers", "1,3"],
    # stages of no layers: the embedding alone first, and a middle pipeline rank holding nothing
    "pp2_uneven_0_4": ["--target_pipeline_layers", "0,4"],
    "pp3_uneven_2_0_2": ["--target_pipeline_layers", "2,0,2"],
    "pp2_vpp2": ["--target_pipeline_model_parallel_size", "2", "--target_virtual_pipeline_model_parallel_size", "2"],
    # stages in model order: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3 (the output layer alone)
    "pp2_vpp2_uneven_2_1_1_0": ["--target_virtual_pipeline_model_parallel_size", "2", "--target_pipeline_layers", "2,1,1,0"],
}


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("name", ["gpt2_tied", "llama_gqa_untied"])
def test_pipeline_stages_run_in_megatron_core(tmp_path, name, pipeline):
    """One gloo process per pipeline rank builds its stages from our args (first/last stage layer counts,
    virtual chunks) and loads its rank file; hidden states pass stage to stage: proves layer placement,
    per-stage layer numbering, and the embedding and (tied) output layer copies on the end stages."""
    model = MODELS[name](tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--transformer_impl", "local", *PIPELINES[pipeline]) == 0
    assert_logits_close(megatron_core_logits(tmp_path / "m", tmp_path), logits_of(model), atol=ATOL)


@pytest.mark.parametrize("name, flags, tp, ep", [
    ("mixtral", ["--target_expert_model_parallel_size", "2", "--target_virtual_pipeline_model_parallel_size", "2"], 1, 2),
], ids=["ep2_pp2_vpp2"])
def test_pipeline_with_tensor_or_expert_parallel_runs_in_megatron_core(tmp_path, name, flags, tp, ep):
    """Four gloo processes, each loading its mp_rank_TT_PPP_EEE file: rank-file naming and placement when
    virtual pipeline stages combine with expert parallelism (TP2 PP2 and EP2 PP2: the family kit)."""
    model = MODELS[name](tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_pipeline_model_parallel_size", "2", "--transformer_impl", "local", *flags) == 0
    assert_logits_close(megatron_core_logits(tmp_path / "m", tmp_path, tp=tp, ep=ep), logits_of(model), atol=ATOL)


def test_uneven_virtual_pipeline_written_from_hf_runs_in_megatron_core(tmp_path):
    model = tiny_gpt2(tmp_path / "hf", layers=6, seed=4)
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_pipeline_layers", "1,2,2,1", "--target_virtual_pipeline_model_parallel_size", "2",
                   "--transformer_impl", "local") == 0
    state = torch.load(tmp_path / "m/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)
    assert state["args"].pipeline_model_parallel_layout == "Et|tt|tt|tL"
    layers = [{key.split(".")[2] for key in state[chunk] if key.startswith("decoder.layers.")} for chunk in ("model0", "model1")]
    assert layers == [{"0", "1"}, {"0"}]  # stages 1 and 3, numbered from 0 in each chunk
    assert_logits_close(megatron_core_logits(tmp_path / "m", tmp_path), logits_of(model), atol=ATOL)


def test_uneven_virtual_pipeline_layout_runs_in_megatron_core(tmp_path):
    """PP 4 with stages [2, 1, 1, 2] regrouped as PP 2 x VPP 2, then reshaped by us: our args carry the
    stages as a ``pipeline_model_parallel_layout`` string, which megatron-core parses to build the chunks."""
    model = tiny_gpt2(tmp_path / "hf", layers=6, seed=2)
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "four", "--to", "megatron",
                   "--target_pipeline_model_parallel_size", "4", "--target_pipeline_layers", "2,1,1,2") == 0
    source = as_virtual_pipeline(tmp_path / "four", tmp_path / "vpp", pp=2, vpp=2)
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--transformer_impl", "local") == 0
    args = torch.load(tmp_path / "m/release/mp_rank_00_000/model_optim_rng.pt", weights_only=False)["args"]
    assert args.pipeline_model_parallel_layout == "Ett|t|t|ttL"
    assert_logits_close(megatron_core_logits(tmp_path / "m", tmp_path), logits_of(model), atol=ATOL)


SPECS = {
    "gpt2": dict(num_layers=3, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=256,
                 normalization="LayerNorm", layernorm_epsilon=1e-5, add_bias_linear=True, add_qkv_bias=True,
                 openai_gelu=True, position_embedding_type="learned_absolute", max_position_embeddings=64,
                 untie_embeddings_and_output_weights=False, padded_vocab_size=1024, vocab_size=1000,
                 rotary_base=10000),
    "llama": dict(num_layers=3, hidden_size=64, num_attention_heads=4, group_query_attention=True,
                  num_query_groups=2, kv_channels=16, ffn_hidden_size=96, normalization="RMSNorm",
                  layernorm_epsilon=1e-5, add_bias_linear=False, swiglu=True, position_embedding_type="rope",
                  rotary_base=500000, max_position_embeddings=128, untie_embeddings_and_output_weights=True,
                  padded_vocab_size=1024, vocab_size=1000, seed=2),
    "mixtral": dict(num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=True,
                    num_query_groups=2, kv_channels=16, ffn_hidden_size=96, normalization="RMSNorm",
                    layernorm_epsilon=1e-5, add_bias_linear=False, swiglu=True, position_embedding_type="rope",
                    rotary_base=1000000, max_position_embeddings=128, untie_embeddings_and_output_weights=True,
                    padded_vocab_size=1024, vocab_size=1000, num_experts=4, moe_router_topk=2,
                    moe_ffn_hidden_size=96, seed=3),
}


@pytest.mark.parametrize("family", list(SPECS))
def test_megatron_core_state_dict_converts_to_hf(tmp_path, family):
    """A GPTModel's own state_dict() saved as an mp_rank tree -> our HF conversion -> same logits."""
    (tmp_path / "spec.json").write_text(json.dumps(SPECS[family]))
    torch.save(TOKENS, tmp_path / "tokens.pt")
    run_oracle("make", tmp_path / "spec.json", tmp_path / "megatron", tmp_path / "tokens.pt")
    assert convert("--load_path", tmp_path / "megatron", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    assert_logits_close(logits_of(tmp_path / "hf"), torch.load(tmp_path / "megatron_logits.pt"), atol=ATOL)
