"""Megatron-Bridge checkpoints of DeepSeek-V3 and V2 models (MLAModelProvider): every DeepSeek kit variant written as
Megatron-Bridge saves it reads back from run_config.yaml alone to its original's logits, megatron-core computes those
logits from the model run_config.yaml describes, a run_config.yaml shaped as Megatron-Bridge 0.6.2's DeepSeek-V3
bridge writes it is read, and provider fields no Hugging Face DeepSeek model has are refused with one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from checkpoint_convert.formats.megatron_formats import open_megatron_tree
from tests.family_kit import VARIANTS
from tests.helpers import TOKENS, assert_logits_close, convert, logits_of, with_args
from tests.test_errors import snapshot
from tests.test_family_kit import MEGATRON_CORE_ATOL, ORACLE

MLA_PROVIDER = "megatron.bridge.models.mla_provider.MLAModelProvider"
DEEPSEEK = {variant.name: variant for variant in VARIANTS if variant.family.startswith("deepseek")}


class Trees:
    """Each DeepSeek variant's model, logits and Megatron-Bridge tree (local spec, no Megatron-LM tracker; its
    common.pt, which megatron-core's loader wants, is not read: run_config.yaml describes the model), made once."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, {}

    def get(self, name: str) -> tuple[Path, torch.Tensor]:
        if name not in self.made:
            hf, bridge = self.root / name / "hf", self.root / name / "bridge"
            logits = logits_of(DEEPSEEK[name].build(hf))
            assert convert("--load_path", hf, "--save_path", bridge, "--to", "megatron", "--megatron_bridge",
                           "--transformer_impl", "local") == 0
            (bridge / "latest_checkpointed_iteration.txt").unlink()
            assert open_megatron_tree(bridge).args_file.name == "run_config.yaml"
            self.made[name] = bridge, logits
        return self.made[name]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Trees:
    return Trees(tmp_path_factory.mktemp("bridge_deepseek"))


def _model(tree: Path) -> dict:
    return yaml.safe_load((tree / "iter_0000000" / "run_config.yaml").read_text())["model"]


@pytest.mark.parametrize("name", list(DEEPSEEK))
def test_deepseek_bridge_checkpoint_reads_back_from_run_config(trees, tmp_path, name):
    tree, logits = trees.get(name)
    model, hf = _model(tree), json.loads((tree.parent / "hf" / "config.json").read_text())
    assert model["_target_"] == MLA_PROVIDER and model["multi_latent_attention"] is True
    assert (model["q_lora_rank"], model["kv_lora_rank"], model["qk_head_dim"], model["qk_pos_emb_head_dim"],
            model["v_head_dim"]) == (hf["q_lora_rank"], hf["kv_lora_rank"], hf["qk_nope_head_dim"],
                                     hf["qk_rope_head_dim"], hf["v_head_dim"])
    assert model["position_embedding_type"] == "rope" and model["mtp_num_layers"] is None
    assert model["transformer_layer_spec"]["_target_"].endswith("gpt_layer_specs.get_gpt_decoder_block_spec")
    assert convert("--load_path", tree, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == DEEPSEEK[name].family
    assert_logits_close(logits_of(tmp_path / "out"), logits)


@pytest.fixture(scope="module")
def megatron_core(trees) -> dict[str, torch.Tensor]:
    """megatron-core's logits of every variant's tree, its GPTModel built from run_config.yaml (one process)."""
    jobs = [dict(kind="dist-logits", name=name, ckpt=str(trees.get(name)[0]), tokens=str(trees.root / "tokens.pt"),
                 out=str(trees.root / f"{name}.pt"), tp=1) for name in DEEPSEEK]
    torch.save(TOKENS, trees.root / "tokens.pt")
    (trees.root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ORACLE), "batch", trees.root / "jobs.json", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: torch.load(trees.root / f"{name}.pt") for name in DEEPSEEK}


@pytest.mark.parametrize("name", list(DEEPSEEK))
def test_megatron_core_computes_the_model_run_config_describes(trees, megatron_core, name):
    assert_logits_close(megatron_core[name], trees.get(name)[1], atol=MEGATRON_CORE_ATOL)


def _copy_with(trees: Trees, tmp_path: Path, name: str, **fields) -> Path:
    source = tmp_path / "src"
    shutil.copytree(trees.get(name)[0], source)
    file = source / "iter_0000000" / "run_config.yaml"
    config = yaml.safe_load(file.read_text())
    config["model"].update(fields)
    file.write_text(yaml.safe_dump(config))
    return source


def test_run_config_as_bridge_writes_deepseek_v3_is_read(trees, tmp_path):
    """Megatron-Bridge 0.6.2's DeepSeekV3Bridge.provider_bridge (models/deepseek/deepseek_v3_bridge.py) and
    MegatronModelBridge.provider_bridge (conversion/model_bridge.py): MLA rope fields with a YaRN factor of 1
    when the model has no rope scaling, kv_channels from Hugging Face's head_dim (qk_rope_head_dim), a pre-softmax
    flag on its sigmoid router, megatron-core's decoder block spec as a partial, 1280 as its vocab multiple."""
    source = _copy_with(
        trees, tmp_path, "deepseek_v3_moe_halves_tied", rope_type="yarn", rotary_scaling_factor=1.0, mscale=1.0,
        mscale_all_dim=1.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, kv_channels=8,
        moe_router_pre_softmax=True, moe_router_load_balancing_type="seq_aux_loss", moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall", moe_shared_expert_overlap=True, moe_permute_fusion=True,
        moe_aux_loss_coeff=0.0001, make_vocab_size_divisible_by=1280, attention_softmax_in_fp32=False,
        cross_entropy_fusion_impl="te", mtp_num_layers=None, transformer_layer_spec={
            "_target_": "megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_block_spec", "_partial_": True,
            "_args_": [], "use_transformer_engine": False})
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    assert config["model_type"] == "deepseek_v3" and rope.get("rope_type", "default") == "default", rope  # factor 1
    assert_logits_close(logits_of(tmp_path / "out"), trees.get("deepseek_v3_moe_halves_tied")[1])


@pytest.mark.parametrize("name, fields, message", [
    ("deepseek_v3_mla", dict(rope_type="rope", rotary_scaling_factor=40.0, mscale_all_dim=1.0),
     "model.rope_type is 'rope' but rotary_scaling_factor 40.0 and mscale_all_dim 1.0 scale the attention"),
    ("deepseek_v3_mla", dict(position_embedding_type="yarn"), "model.position_embedding_type yarn with rope_type"),
    ("deepseek_v3_moe_halves_tied", dict(mtp_num_layers=1), "tensor 'mtp.layers.0.enorm.weight' is missing"),
    ("deepseek_v2_moe", dict(moe_router_enable_expert_bias=True),
     "moe_router_enable_expert_bias with moe_router_score_function softmax"),
    ("deepseek_v3_moe_halves_tied", dict(moe_router_topk_limited_devices=2),
     "model.moe_router_topk_limited_devices is 2; no model family here converts"),
])
def test_provider_fields_no_deepseek_model_has_are_refused(trees, tmp_path, capsys, name, fields, message):
    source = _copy_with(trees, tmp_path, name, **fields)
    before = snapshot(source)
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "run_config.yaml" in err and "\n" not in err, err
    assert snapshot(source) == before and not (tmp_path / "out").exists()


def test_group_limited_routing_hugging_face_cannot_express_is_refused(trees, tmp_path, capsys):
    """megatron-core ranks groups by their best topk // group_topk scores, DeepSeek-V3's Hugging Face router by its
    best two: top-2 of 2 groups (best one each) converts between Megatron layouts but has no Hugging Face config."""
    source = _copy_with(trees, tmp_path, "deepseek_v3_moe_halves_tied", moe_router_topk=2, moe_router_group_topk=2)
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert "num_experts_per_tok 2 with topk_group 2" in err and "best 2 scores" in err and "\n" not in err, err
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron") == 0


def test_declared_mtp_layers_are_left_out_when_asked(trees, tmp_path):
    source = _copy_with(trees, tmp_path, "deepseek_v3_mla", mtp_num_layers=1)
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf", "--drop_mtp_layers") == 0
    assert_logits_close(logits_of(tmp_path / "out"), trees.get("deepseek_v3_mla")[1])


def test_kimi_k2_provider_is_read_as_deepseek_v3(trees, tmp_path):
    """Megatron-Bridge's KimiK2Provider (models/kimi/kimi_provider.py: MLA and DeepSeek-V3's router) is a
    DeepSeek-V3 model."""
    source = _copy_with(trees, tmp_path, "deepseek_v3_moe_halves_tied",
                        _target_="megatron.bridge.models.kimi.kimi_provider.KimiK2Provider")
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert_logits_close(logits_of(tmp_path / "out"), trees.get("deepseek_v3_moe_halves_tied")[1])


def test_run_config_as_bridge_writes_deepseek_v2_lite_with_neutral_router_values_is_read(tmp_path):
    """Megatron-Bridge 0.6.2 writes a DeepSeek-V2-Lite-shaped model (routed_scaling_factor 1.0, n_group 1, topk_group 1,
    topk_method greedy) with the neutral router values moe_router_topk_scaling_factor 1.0, moe_router_num_groups 1,
    moe_router_group_topk 1 (one group, all of it chosen: no group limit; no scaling); they read as what they are."""
    from tests.family_kit import DEEPSEEK_MOE, QWEN_ROPE, hf_model

    lite = dict(DEEPSEEK_MOE, num_experts_per_tok=3, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                topk_method="greedy")
    logits = logits_of(hf_model("DeepseekV2Config", "DeepseekV2ForCausalLM", 12, q_lora_rank=None,
                                rope_parameters=QWEN_ROPE, **lite)(tmp_path / "hf"))
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "bridge", "--to", "megatron",
                   "--megatron_bridge", "--transformer_impl", "local") == 0
    file = tmp_path / "bridge" / "iter_0000000" / "run_config.yaml"
    config = yaml.safe_load(file.read_text())
    config["model"].update(
        moe_router_topk_scaling_factor=1.0, moe_router_num_groups=1, moe_router_group_topk=1,
        moe_router_score_function="softmax", moe_router_pre_softmax=True, moe_router_enable_expert_bias=False,
        rope_type="yarn", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0,
        original_max_position_embeddings=4096, moe_router_load_balancing_type="seq_aux_loss",
        make_vocab_size_divisible_by=3200, mtp_num_layers=None)
    file.write_text(yaml.safe_dump(config))
    assert convert("--load_path", tmp_path / "bridge", "--save_path", tmp_path / "ranks", "--to", "megatron",
                   "--megatron_ckpt_format", "torch", "--no-megatron_bridge") == 0
    ranks = with_args(tmp_path / "ranks", tmp_path / "ranks_neutral", moe_router_topk_scaling_factor=1.0,
                      moe_router_num_groups=1, moe_router_group_topk=1)  # the same values as Megatron-LM args
    for kind, source in (("run_config.yaml", tmp_path / "bridge"), ("args", ranks)):
        assert convert("--load_path", source, "--save_path", tmp_path / f"out_{kind}", "--to", "hf") == 0, kind
        out = json.loads((tmp_path / f"out_{kind}" / "config.json").read_text())
        assert (out["model_type"], out["topk_method"], out["n_group"], out["topk_group"],
                out["routed_scaling_factor"]) == ("deepseek_v2", "greedy", 1, 1, 1.0), out
        assert_logits_close(logits_of(tmp_path / f"out_{kind}"), logits)
