"""Qwen2-MoE and Qwen3-MoE beyond the family kit (``tests/family_kit.py`` runs them through every direction, layout
and megatron-core): older transformers' per-expert layout, Megatron-LM's ``moe_layer_freq`` as an int, the
``decoder_sparse_step`` / ``mlp_only_layers`` written for a Megatron source, and expert layers or routing a
Hugging Face model cannot express refused with one line."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest

from checkpoint_convert.model.arch import ModelArch
from checkpoint_convert.model.family import sparse_step_kwargs
from checkpoint_convert.formats.megatron_args import arch_from_args
from tests.family_kit import VARIANTS
from tests.helpers import assert_logits_close, convert, logits_of, per_expert_layout, stored_names, with_args
from tests.test_errors import snapshot

BY_NAME = {variant.name: variant for variant in VARIANTS}


@pytest.fixture(scope="module")
def qwen_moe(tmp_path_factory):
    """Qwen2-MoE with experts in layers 1 and 3 and Qwen3-MoE (dense layer 3): Hugging Face, and Megatron TP1."""
    root = tmp_path_factory.mktemp("qwen_moe")
    logits = {}
    for name in ("qwen2_moe_sparse_step", "qwen3_moe_window"):
        logits[name] = logits_of(BY_NAME[name].build(root / name))
        assert convert("--load_path", root / name, "--save_path", root / f"{name}_megatron", "--to", "megatron") == 0
    return root, logits


def test_old_per_expert_hf_layout_converts(qwen_moe, tmp_path):
    """``mlp.experts.E.{gate,up,down}_proj``, as transformers 4 wrote Qwen2-MoE and Qwen3-MoE."""
    root, logits = qwen_moe
    old = per_expert_layout(root / "qwen2_moe_sparse_step", tmp_path / "old", {}, "gate_proj", "up_proj", "down_proj")
    assert "model.layers.3.mlp.experts.3.up_proj.weight" in stored_names(old)
    assert convert("--load_path", old, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2", "--target_tensor_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), logits["qwen2_moe_sparse_step"])


@pytest.mark.parametrize("freq, pattern", [(1, None), (2, (1, 0, 1, 0)), (3, (1, 0, 0, 1)), ([0, 1, 1, 1], (0, 1, 1, 1)),
                                           ([1, 1, 1, 1], None)])
def test_moe_layer_freq_of_megatron_lm_args(freq, pattern):
    """An int N puts experts in layers 0, N, 2N... (megatron-core's get_gpt_decoder_layer_specs), a list per layer."""
    args = argparse.Namespace(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1000, num_experts=4,
                              moe_layer_freq=freq)
    assert arch_from_args(args, "args").moe_layers == pattern


@pytest.mark.parametrize("pattern, recorded, spelled", [
    ((0, 1, 0, 1), {}, {"decoder_sparse_step": 2, "mlp_only_layers": []}),
    ((1, 0, 1, 0), {}, {"decoder_sparse_step": 1, "mlp_only_layers": [1, 3]}),  # Megatron-LM's moe_layer_freq 2
    ((0, 1, 0, 1), {"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]},  # the source's own spelling, kept
     {"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]}),
    ((0, 1, 0, 0), {"decoder_sparse_step": 2}, {"decoder_sparse_step": 1, "mlp_only_layers": [0, 2, 3]}),
], ids=["sparse-step", "megatron-int", "recorded", "recorded-outdated"])
def test_expert_layers_spelled_for_transformers(pattern, recorded, spelled):
    """The config written for a Megatron source builds expert blocks exactly where Megatron has experts, as
    transformers' own Qwen2-MoE decoder layers decide."""
    import transformers

    arch = ModelArch(family="qwen2_moe", num_layers=4, hidden_size=16, num_attention_heads=2, num_query_groups=2,
                     kv_channels=8, ffn_hidden_size=32, vocab_size=64, max_position_embeddings=32, num_experts=2,
                     moe_layers=pattern, extra=recorded)
    kwargs = sparse_step_kwargs(arch)
    assert kwargs == spelled
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2, num_experts=2,
                                         moe_intermediate_size=8, shared_expert_intermediate_size=8, **kwargs)
    model = transformers.Qwen2MoeForCausalLM(config)
    sparse = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock
    assert tuple(int(isinstance(layer.mlp, sparse)) for layer in model.model.layers) == pattern


def _refused(capsys, source, out, message, file) -> None:
    before, _ = snapshot(source), capsys.readouterr()
    assert convert("--load_path", source, "--save_path", out, "--to", "megatron" if file == "config.json" else "hf") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and file in err and "\n" not in err, err
    assert snapshot(source) == before and not out.exists()


@pytest.mark.parametrize("name, key, value, message", [
    ("qwen3_moe_window", "decoder_sparse_step", 0, "decoder_sparse_step is 0, not a whole number of at least 1"),
    ("qwen3_moe_window", "mlp_only_layers", [1, 7], "mlp_only_layers is [1, 7], not a list of layer indices below 4"),
    ("qwen3_moe_window", "mlp_only_layers", [0, 1, 2, 3], "leave no layer with experts"),
    ("qwen2_moe_sparse_step", "shared_expert_intermediate_size", 40,
     "shared_expert_intermediate_size is 40, but the tensors fit shared_expert_intermediate_size=48"),
    ("qwen2_moe_sparse_step", "decoder_sparse_step", 1, "the tensors fit decoder_sparse_step=2"),
])
def test_bad_expert_layers_in_config_are_refused(qwen_moe, tmp_path, capsys, name, key, value, message):
    root, _ = qwen_moe
    source = shutil.copytree(root / name, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, key: value}))
    _refused(capsys, source, tmp_path / "out", message, "config.json")


@pytest.mark.parametrize("changes, message", [
    ({"moe_router_score_function": "sigmoid"}, "the router scores experts with sigmoid; a qwen3_moe router takes a "
                                               "softmax and does not scale"),
    ({"moe_router_topk_scaling_factor": 2.5}, "scales them by 2.5"),
    ({"moe_layer_freq": [1, 1, 0]}, "moe_layer_freq is [1, 1, 0], not a whole number or a list of num_layers=4"),
    ({"moe_router_group_topk": 1, "moe_router_num_groups": 2}, "the router limits each token to 1 of 2 groups of "
                                                               "experts, which a qwen3_moe router does not"),
])
def test_routing_a_hugging_face_model_cannot_express_is_refused(qwen_moe, tmp_path, capsys, changes, message):
    root, _ = qwen_moe
    source = with_args(root / "qwen3_moe_window_megatron", tmp_path / "src", **changes)
    _refused(capsys, source, tmp_path / "out", message, "model_optim_rng.pt")


def test_mixtral_router_that_does_not_renormalise_is_refused(tmp_path, capsys):
    """Mixtral always renormalises its top-k weights: Megatron's softmax before the top-k has no Mixtral config."""
    BY_NAME["mixtral"].build(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron") == 0
    source = with_args(tmp_path / "m", tmp_path / "src", moe_router_pre_softmax=True)
    _refused(capsys, source, tmp_path / "out", "the router does not renormalise its top-k weights", "model_optim_rng.pt")


def test_neutral_router_values_read_as_no_groups_and_no_scaling(qwen_moe, tmp_path):
    """One group of which one is chosen, and a scaling factor of 1 (as Megatron-Bridge writes for models without
    groups or scaling) change nothing: the model converts to its original's logits."""
    root, logits = qwen_moe
    source = with_args(root / "qwen3_moe_window_megatron", tmp_path / "src", moe_router_num_groups=1,
                       moe_router_group_topk=1, moe_router_topk_scaling_factor=1.0)
    assert convert("--load_path", source, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), logits["qwen3_moe_window"])
