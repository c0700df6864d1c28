"""Megatron-Bridge checkpoints of Nemotron-H models (HybridModelProvider): the kit's hybrid model written as
Megatron-Bridge 0.6.2 saves it reads back from run_config.yaml alone to its original's logits, megatron-core's
MambaModel loads the tree strictly and computes those logits from the model run_config.yaml describes, an earlier
release's NemotronHModelProvider (hybrid_override_pattern, mamba_stack_spec) is read, and a run_config.yaml whose
Mamba sizes or pattern lie is refused with one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader

from tests.family_kit import VARIANTS
from tests.helpers import TOKENS, assert_logits_close, convert, logits_of
from tests.test_errors import snapshot
from tests.test_family_kit import MEGATRON_CORE_ATOL, ORACLE

HYBRID_PROVIDER = "megatron.bridge.models.hybrid.hybrid_provider."
# pattern *MM- (attention, Mamba, MLP), and ME*E (experts: DeepSeek-V3's router, a shared expert)
KIT = {variant.name: variant for variant in VARIANTS if variant.name in ("nemotron_h_hybrid_mha", "nemotron_h_moe")}


def _made(root: Path, name: str) -> tuple[Path, torch.Tensor]:
    logits = logits_of(KIT[name].build(root / name / "hf"))
    assert convert("--load_path", root / name / "hf", "--save_path", root / name / "bridge", "--to", "megatron",
                   "--megatron_bridge") == 0
    return root / name / "bridge", logits


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Each kit model's Megatron-Bridge tree (Transformer Engine's spec) and the model's logits."""
    root = tmp_path_factory.mktemp("bridge_nemotron_h")
    return {name: _made(root, name) for name in KIT}


@pytest.fixture(scope="module")
def bridge(trees) -> tuple[Path, torch.Tensor]:
    return trees["nemotron_h_hybrid_mha"]


def _model(tree: Path) -> dict:
    return yaml.safe_load((tree / "iter_0000000" / "run_config.yaml").read_text())["model"]


def test_nemotron_h_bridge_checkpoint_reads_back_from_run_config(bridge, tmp_path):
    tree, logits = bridge
    model, hf = _model(tree), json.loads((tree.parent / "hf" / "config.json").read_text())
    assert model["_target_"] == HYBRID_PROVIDER + "HybridModelProvider"
    assert model["hybrid_layer_pattern"] == "*MM-" and "hybrid_override_pattern" not in model
    assert (model["mamba_state_dim"], model["mamba_head_dim"], model["mamba_num_groups"], model["mamba_num_heads"],
            model["mamba_chunk_size"]) == (hf["ssm_state_size"], hf["mamba_head_dim"], hf["n_groups"],
                                           hf["mamba_num_heads"], hf["chunk_size"])
    assert model["activation_func"]["_target_"] == "megatron.core.activations.squared_relu"
    assert model["hybrid_stack_spec"]["_target_"] == HYBRID_PROVIDER + "transformer_engine_hybrid_stack_spec"
    assert "transformer_layer_spec" not in model and model["position_embedding_type"] == "none"
    keys = set(FileSystemReader(str(tree / "iter_0000000")).read_metadata().state_dict_metadata)
    # NemotronHBridge's names (models/nemotronh/nemotron_h_bridge.py): Transformer Engine's fused norms; the
    # mixer's in_proj and conv1d in megatron-core's torch_dist parts (MambaMixer.sharded_state_dict)
    assert {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.1.mixer.A_log",
            "decoder.layers.1.mixer.in_proj.layer_norm_weight", "decoder.layers.2.mixer.conv1d.weight.x",
            "decoder.layers.2.mixer.in_proj.weight.z",
            "decoder.layers.3.mlp.linear_fc1.layer_norm_weight", "decoder.final_norm.weight"} <= keys
    assert convert("--load_path", tree, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layers_block_type"] == hf["layers_block_type"]
    assert_logits_close(logits_of(tmp_path / "out"), logits)


@pytest.fixture(scope="module")
def megatron_core(trees, tmp_path_factory) -> dict[str, torch.Tensor]:
    """megatron-core's logits of every kit model's tree, its MambaModel built from run_config.yaml (one process)."""
    root = tmp_path_factory.mktemp("bridge_nemotron_h_oracle")
    torch.save(TOKENS, root / "tokens.pt")
    jobs = [dict(kind="dist-logits", name=name, ckpt=str(tree), tokens=str(root / "tokens.pt"),
                 out=str(root / f"{name}.pt"), tp=1) for name, (tree, _) in trees.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ORACLE), "batch", root / "jobs.json", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: torch.load(root / f"{name}.pt") for name in trees}


@pytest.mark.parametrize("name", list(KIT))
def test_megatron_core_computes_the_model_run_config_describes(trees, megatron_core, name):
    """megatron-core's MambaModel (tests/mamba_oracle.py), built from run_config.yaml as this tool reads it, loads
    every tensor it asks for from the tree (strictly) and gives the Hugging Face model's logits."""
    assert_logits_close(megatron_core[name], trees[name][1], atol=MEGATRON_CORE_ATOL)


def test_experts_read_back_from_run_config(trees, tmp_path):
    tree, logits = trees["nemotron_h_moe"]
    model = _model(tree)
    assert (model["hybrid_layer_pattern"], model["num_moe_experts"], model["moe_router_score_function"],
            model["moe_router_enable_expert_bias"]) == ("ME*E", 8, "sigmoid", True)
    assert convert("--load_path", tree, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "out"), logits)


def _copy_with(tree: Path, tmp_path: Path, drop: tuple[str, ...] = (), **fields) -> Path:
    source = tmp_path / "src"
    shutil.copytree(tree, source)
    file = source / "iter_0000000" / "run_config.yaml"
    config = yaml.safe_load(file.read_text())
    config["model"].update(fields)
    for name in drop:
        del config["model"][name]
    file.write_text(yaml.safe_dump(config))
    return source


def test_an_earlier_releases_nemotron_h_provider_is_read(bridge, tmp_path):
    """Megatron-Bridge's NemotronHModelProvider (models/nemotronh/nemotron_h_provider.py, a MambaModelProvider):
    the pattern as hybrid_override_pattern, the stack spec as mamba_stack_spec."""
    tree, logits = bridge
    source = _copy_with(tree, tmp_path, drop=("hybrid_layer_pattern", "hybrid_stack_spec"),
                        _target_="megatron.bridge.models.nemotronh.nemotron_h_provider.NemotronHModelProvider",
                        hybrid_override_pattern="*MM-", mamba_stack_spec={
                            "_call_": False, "_target_": "megatron.bridge.models.mamba.mamba_provider."
                                                        "get_default_mamba_stack_spec"})
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "out"), logits)


@pytest.mark.parametrize("fields, message", [
    (dict(mamba_num_heads=4), "does not fit the tensors: layer 1 'mixer.in_proj.weight' is [200, 64], not [132, 64]"),
    (dict(hybrid_override_pattern="*MM-"), "model.hybrid_layer_pattern and model.hybrid_override_pattern are both"),
    (dict(hybrid_layer_pattern="*M--"), "layer 2 tensor 'pre_mlp_layernorm.weight' is missing"),
])
def test_a_run_config_that_lies_is_refused(bridge, tmp_path, capsys, fields, message):
    source = _copy_with(bridge[0], tmp_path, **fields)
    before = snapshot(source)
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "run_config.yaml" in err and "\n" not in err, err
    assert snapshot(source) == before and not (tmp_path / "out").exists()


def test_local_norms_are_written_as_modelopts_hybrid_spec(bridge, tmp_path):
    """``--transformer_impl local``: Megatron-Bridge's ModelOpt hybrid spec (torch norms, saved under Transformer
    Engine's names as ``remap_te_layernorm`` asks), read back to the original's logits."""
    tree, logits = bridge
    assert convert("--load_path", tree, "--save_path", tmp_path / "local", "--to", "megatron", "--megatron_bridge",
                   "--transformer_impl", "local") == 0
    spec = _model(tmp_path / "local")["hybrid_stack_spec"]
    assert spec == {"_call_": False, "_target_": HYBRID_PROVIDER + "modelopt_hybrid_stack_spec"}
    assert convert("--load_path", tmp_path / "local", "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "out"), logits)


def test_run_config_as_bridge_writes_nemotron_h_is_read(bridge, tmp_path):
    """Megatron-Bridge 0.6.2's own import of the kit model (NemotronHBridge.provider_bridge,
    models/nemotronh/nemotron_h_bridge.py) writes these values: no stack spec (its default, Transformer Engine's),
    the deprecated pattern field null, and the router and expert sizes of the Hugging Face config's defaults
    although the pattern has no expert layer."""
    tree, logits = bridge
    source = _copy_with(
        tree, tmp_path, hybrid_stack_spec=None, hybrid_override_pattern=None, mtp_hybrid_override_pattern=None,
        mtp_num_layers=0, num_moe_experts=8, moe_ffn_hidden_size=7688, moe_shared_expert_intermediate_size=7688,
        moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.0001, moe_router_num_groups=1,
        moe_router_group_topk=1, moe_router_topk_scaling_factor=1.0, moe_router_dtype="fp32",
        first_last_layers_bf16=True, fp32_residual_connection=False, make_vocab_size_divisible_by=8)
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "out"), logits)
