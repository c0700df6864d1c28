"""Mixtral (mixture of experts) with expert parallelism, in every direction."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_logits_close, convert, logits_of, per_expert_layout, randomize, stored_names


def tiny_mixtral(path: Path, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2,
                           rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
    model = randomize(MixtralForCausalLM(config), seed).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    model = tiny_mixtral(path)
    return path, model, logits_of(model)


def _ranks(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "release").iterdir() if p.is_dir())


# EP1 and EP2 with PP2: the family kit (test_family_kit.py)
@pytest.mark.parametrize("flags,ranks", [
    (["--target_expert_model_parallel_size", "2", "--target_tensor_model_parallel_size", "2"],
     ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    (["--target_expert_model_parallel_size", "4"], [f"mp_rank_00_{e:03d}" for e in range(4)]),
    (["--target_tensor_model_parallel_size", "2", "--moe_grouped_gemm", "--megatron_format", "mcore"],
     ["mp_rank_00", "mp_rank_01"]),
], ids=["tp2ep2", "ep4", "tp2-grouped"])
def test_hf_to_megatron_to_hf(mixtral, tmp_path, flags, ranks):
    path, _, expected = mixtral
    assert convert("--load_path", path, "--save_path", tmp_path / "m", "--to", "megatron", *flags) == 0
    assert _ranks(tmp_path / "m") == ranks
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["router_aux_loss_coef"]) == (4, 2, 0.02)
    assert config["rope_parameters"]["rope_theta"] == 1000000.0


def test_expert_placement_in_rank_files(mixtral, tmp_path):
    path, model, _ = mixtral
    assert convert("--load_path", path, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2", "--target_tensor_model_parallel_size", "2") == 0
    rank = torch.load(tmp_path / "m/release/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    assert rank["args"].expert_model_parallel_size == 2 and rank["args"].num_experts == 4
    fc1 = rank["model"]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]
    # EP rank 1 holds global experts 2 and 3; TP rank 1 holds the second half of gate rows and of up rows
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach()[2]
    gate, up = gate_up.chunk(2)
    assert torch.equal(fc1, torch.cat([gate[48:], up[48:]]))
    assert "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight" not in rank["model"]
    assert torch.equal(rank["model"]["decoder.layers.1.mlp.router.weight"], model.model.layers[1].mlp.gate.weight.detach())


@pytest.mark.parametrize("target", [["--target_expert_model_parallel_size", "4"],
                                    ["--target_expert_model_parallel_size", "1", "--target_tensor_model_parallel_size", "1"]],
                         ids=["ep2-to-ep4", "ep2-to-ep1"])
def test_reshape_expert_parallel(mixtral, tmp_path, target):
    path, _, expected = mixtral
    assert convert("--load_path", path, "--save_path", tmp_path / "a", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2", "--target_tensor_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "a", "--save_path", tmp_path / "b", "--to", "megatron", *target) == 0
    assert convert("--load_path", tmp_path / "b", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)


def test_grouped_gemm_layouts_are_read(mixtral, tmp_path):
    """TEGroupedMLP (weightJ) is written and read; GroupedMLP (weight1/weight2) is read."""
    path, model, expected = mixtral
    assert convert("--load_path", path, "--save_path", tmp_path / "te", "--to", "megatron", "--moe_grouped_gemm",
                   "--target_expert_model_parallel_size", "2") == 0
    rank = torch.load(tmp_path / "te/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)["model"]
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight1" in rank
    assert "decoder.layers.0.mlp.experts.linear_fc1._extra_state" in rank
    assert convert("--load_path", tmp_path / "te", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)
    # GroupedMLP: rewrite the SequentialMLP tensors of an EP2 tree into weight1/weight2 as megatron-core stores them
    assert convert("--load_path", path, "--save_path", tmp_path / "seq", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2", "--transformer_impl", "local") == 0
    for ep in range(2):
        file = tmp_path / f"seq/release/mp_rank_00_{ep:03d}/model_optim_rng.pt"
        state = torch.load(file, weights_only=False)
        sd = state["model"]
        for layer in range(4):
            prefix = f"decoder.layers.{layer}.mlp.experts."
            fc1 = [sd.pop(f"{prefix}local_experts.{j}.linear_fc1.weight") for j in range(2)]
            fc2 = [sd.pop(f"{prefix}local_experts.{j}.linear_fc2.weight") for j in range(2)]
            for j in range(2):
                sd.pop(f"{prefix}local_experts.{j}.linear_fc1._extra_state", None)
                sd.pop(f"{prefix}local_experts.{j}.linear_fc2._extra_state", None)
            sd[f"{prefix}weight1"] = torch.stack([w.t() for w in fc1]).reshape(64, -1)  # [E, h, 2f] viewed [h, E*2f]
            sd[f"{prefix}weight2"] = torch.stack([w.t() for w in fc2]).reshape(-1, 64)  # [E, f, h] viewed [E*f, h]
        torch.save(state, file)
    assert convert("--load_path", tmp_path / "seq", "--save_path", tmp_path / "hf2", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf2"), expected)


def test_expert_parallel_not_dividing_experts_is_rejected(mixtral, tmp_path, capsys):
    path, _, _ = mixtral
    assert convert("--load_path", path, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_expert_model_parallel_size", "3") == 2
    assert "expert parallel size 3 does not divide the 4 experts" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_old_per_expert_hf_layout_converts(mixtral, tmp_path):
    """block_sparse_moe.experts.E.w1/w2/w3 and block_sparse_moe.gate, as older transformers wrote them."""
    path, _, expected = mixtral
    old = per_expert_layout(path, tmp_path / "old", {"mlp.experts.": "block_sparse_moe.experts.",
                                                     "mlp.gate.": "block_sparse_moe.gate."}, "w1", "w3", "w2")
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.3.w3.weight"} \
        <= stored_names(old)
    assert convert("--load_path", old, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)
