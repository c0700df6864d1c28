"""Megatron-Bridge checkpoints: a real one (Megatron-Bridge 0.6.2's import of a Hugging Face Llama) converts to
its original's logits in every direction, every family's Megatron-Bridge output reads back through
run_config.yaml alone, and a run_config.yaml that needs code to be understood is refused."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from checkpoint_convert.model import family as family_registry
from checkpoint_convert.model.arch import ModelArch
from checkpoint_convert.formats.bridge_config import args_from_run_config, run_config_for
from checkpoint_convert.formats.megatron_args import CheckpointFacts, ParallelLayout, arch_from_args, args_from_arch
from checkpoint_convert.formats.megatron_formats import open_megatron_tree
from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli
from tests.family_kit import VARIANTS
from tests.helpers import assert_logits_close, convert, logits_of, tiny_gpt2
from tests.test_errors import snapshot
from tests.test_llama import tiny_llama
from tests.test_mixtral import tiny_mixtral

KIT = {variant.name: variant for variant in VARIANTS}

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "megatron_bridge_llama"
BRIDGE_TREE = FIXTURE / "bridge"
RUN_CONFIG = BRIDGE_TREE / "iter_0000000" / "run_config.yaml"


@pytest.fixture(scope="module")
def original_logits():
    return logits_of(FIXTURE / "hf")


def test_bridge_checkpoint_converts_to_hf_with_its_tokenizer(tmp_path, original_logits):
    before = snapshot(BRIDGE_TREE)
    assert convert("--load_path", BRIDGE_TREE, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), original_logits)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    copied = BRIDGE_TREE / "iter_0000000" / "tokenizer" / "tokenizer.json"
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == copied.read_bytes()
    assert snapshot(BRIDGE_TREE) == before


@pytest.mark.parametrize("flags", [
    ["--megatron_ckpt_format", "torch", "--target_tensor_model_parallel_size", "2",
     "--target_pipeline_model_parallel_size", "2"],
    ["--no-megatron_bridge"],  # Megatron-LM's torch_dist: release/ and common.pt's args, no run_config.yaml
    [],  # unspecified: saved as Megatron-Bridge saves, like the source
])
def test_bridge_checkpoint_converts_to_megatron_layouts(tmp_path, original_logits, flags):
    assert convert("--load_path", BRIDGE_TREE, "--save_path", tmp_path / "m", "--to", "megatron", *flags) == 0
    bridge_output = not flags
    assert (tmp_path / "m" / "iter_0000000" / "run_config.yaml").is_file() == bridge_output
    assert open_megatron_tree(tmp_path / "m").producer == ("megatron-bridge" if bridge_output else "megatron")
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), original_logits)


def test_inspect_and_verify_read_bridge_checkpoints(capsys):
    assert run_inspect_cli([str(BRIDGE_TREE), "--json", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "megatron-bridge torch_dist" and report["family"] == "llama"
    assert report["vocab"] == {"true": 1000, "padded": 1000} and report["problems"] == []
    assert report["architecture"]["num_query_groups"] == 2 and report["architecture"]["max_position_embeddings"] == 256
    args = open_megatron_tree(BRIDGE_TREE).args  # what Megatron-LM output records of the tokenizer
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer",
                                                           str((BRIDGE_TREE / "iter_0000000" / "tokenizer").resolve()))
    assert run_verify_cli([str(BRIDGE_TREE), str(FIXTURE / "hf"), "--logits"]) == 0
    assert capsys.readouterr().out.strip().endswith("EQUAL")


def _llama3(path):
    return tiny_llama(path, rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192})


FAMILIES = {  # family -> (builder, the provider Megatron-Bridge writes for it)
    "gpt2": (tiny_gpt2, "megatron.bridge.models.gpt_provider.GPTModelProvider"),
    "llama": (_llama3, "megatron.bridge.models.gpt_provider.GPTModelProvider"),
    "mistral": (lambda path: tiny_llama(path, family="mistral", seed=2, sliding_window=8),
                "megatron.bridge.models.mistral.mistral_provider.MistralModelProvider"),
    "mixtral": (tiny_mixtral, "megatron.bridge.models.gpt_provider.GPTModelProvider"),
    # shared experts behind a gate, dense layers among expert layers, top-k not renormalised
    "qwen2_moe": (KIT["qwen2_moe_sparse_step"].build, "megatron.bridge.models.gpt_provider.GPTModelProvider"),
    "qwen3_moe": (KIT["qwen3_moe_window"].build, "megatron.bridge.models.gpt_provider.GPTModelProvider"),
    "gpt_oss": (KIT["gpt_oss_window_yarn"].build, "megatron.bridge.models.gpt_oss.gpt_oss_provider.GPTOSSProvider"),
    # hybrid Mamba: tests/test_megatron_bridge_nemotron_h.py
    "nemotron_h": (KIT["nemotron_h_hybrid_mha"].build,
                   "megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_writes_bridge_checkpoints_read_back_from_run_config(tmp_path, family):
    """Megatron-Bridge 0.6 checkpoints have no common.pt and may have no Megatron-LM tracker: both are removed,
    so the architecture can only come from run_config.yaml and the iteration from latest_train_state.pt."""
    build, provider = FAMILIES[family]
    model = build(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "b", "--to", "megatron",
                   "--megatron_bridge") == 0
    iter_dir = tmp_path / "b" / "iter_0000000"
    run_config = yaml.safe_load((iter_dir / "run_config.yaml").read_text())
    assert run_config["model"]["_target_"] == provider and (iter_dir / "tokenizer" / "tokenizer.json").is_file()
    assert torch.load(tmp_path / "b" / "latest_train_state.pt", weights_only=True)["step"] == 0
    (iter_dir / "common.pt").unlink()
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").unlink()
    assert open_megatron_tree(tmp_path / "b").producer == "megatron-bridge"
    assert convert("--load_path", tmp_path / "b", "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    assert_logits_close(logits_of(tmp_path / "out"), logits_of(model))


def _arch(**changes) -> ModelArch:
    llama = ModelArch(family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      kv_channels=16, ffn_hidden_size=96, vocab_size=1000, max_position_embeddings=128,
                      tie_embeddings=False, normalization="RMSNorm", activation="swiglu",
                      position_embedding_type="rope", rotary_base=500000.0, add_bias_linear=False,
                      add_qkv_bias=False, params_dtype=torch.bfloat16)
    return llama.replace(**changes)


@pytest.mark.parametrize("arch", [
    _arch(),
    _arch(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}, tie_embeddings=True),
    _arch(rope_scaling={"rope_type": "linear", "factor": 4.0}, add_qkv_bias=True, params_dtype=torch.float16),
    _arch(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                        "beta_slow": 1.0}),
    _arch(family="mixtral", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=96, moe_aux_loss_coeff=0.02),
    _arch(family="qwen2_moe", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layers=(0, 1),
          moe_router_pre_softmax=True, moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
          add_qkv_bias=True),
    *(_arch(family="gpt2", normalization="LayerNorm", activation=act, position_embedding_type="learned_absolute",
            num_query_groups=4, add_bias_linear=True, add_qkv_bias=True, tie_embeddings=True)
      for act in ("gelu", "gelu_new", "gelu_fast")),
], ids=["llama", "llama3-rope-tied", "linear-rope-qkv-bias-fp16", "yarn", "mixtral", "qwen2_moe", "gelu", "gelu_new",
        "gelu_fast"])
def test_architecture_survives_run_config_yaml(arch):
    """The provider written for an architecture, dumped and read back as YAML, is the same architecture."""
    layout = ParallelLayout(tp=2, pp=2, ep=1, stages=(1, 1))
    facts = CheckpointFacts(padded_vocab=arch.vocab_size, dtype=arch.params_dtype, divisible_by=8,
                            impl="transformer_engine", ckpt_format="torch_dist")
    args = args_from_arch(arch, layout, facts)
    config = run_config_for(args, arch, family_registry.family_named(arch.family), Path("/ckpt"), tokenizer=False)
    read = args_from_run_config(yaml.safe_load(yaml.safe_dump(config)), Path("run_config.yaml"))
    assert arch_from_args(read, "run_config.yaml").replace(family=arch.family) == arch
    assert (read.tensor_model_parallel_size, read.pipeline_model_parallel_size) == (2, 2)


def _edit_run_config(root: Path, edit) -> None:
    file = root / "iter_0000000" / "run_config.yaml"
    config = yaml.safe_load(file.read_text())
    edit(config)
    file.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["logger"].update(_target_="os.system"), "'logger' has _target_ 'os.system'"),
    (lambda c: c["model"]["activation_func"].update(_target_="builtins.eval"),
     "'model.activation_func' has _target_ 'builtins.eval'"),
    (lambda c: c["optimizer"]["main_grads_dtype"].update(_target_="torch.load"),
     "'optimizer.main_grads_dtype' has _target_ 'torch.load'"),
    (lambda c: c["model"].update(_target_="my_package.providers.CustomProvider"),
     "model provider _target_ 'my_package.providers.CustomProvider' is not one a family here declares"),
    (lambda c: c["model"].update(window_size=[4095, 4]), "window_size (4095, 4) is not a causal sliding window"),
    (lambda c: c["model"].update(activation_func={"_call_": False, "_target_": "torch.nn.functional.relu"}),
     "model.activation_func torch.nn.functional.relu with gated_linear_unit=True has no conversion here"),
    (lambda c: c["model"].pop("num_layers"), "model: lacks num_layers"),
])
def test_run_config_needing_code_or_unknown_semantics_is_refused(tmp_path, capsys, edit, message):
    shutil.copytree(BRIDGE_TREE, tmp_path / "src")
    _edit_run_config(tmp_path / "src", edit)
    before = snapshot(tmp_path / "src")
    assert convert("--load_path", tmp_path / "src", "--save_path", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "run_config.yaml" in err and err.startswith("error: ") and "\n" not in err, err
    assert snapshot(tmp_path / "src") == before and not (tmp_path / "out").exists()


def test_run_config_with_python_objects_is_refused(tmp_path, capsys):
    """yaml.safe_load constructs no Python objects: a tag asking for one makes the file unreadable."""
    shutil.copytree(BRIDGE_TREE, tmp_path / "src")
    file = tmp_path / "src" / "iter_0000000" / "run_config.yaml"
    tagged = file.read_text().replace("comm_overlap: null", "comm_overlap: !!python/object/apply:os.system [id]")
    file.write_text(tagged)
    assert convert("--load_path", tmp_path / "src", "--save_path", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert "run_config.yaml: unreadable YAML" in err and "\n" not in err, err


def test_family_without_bridge_provider_is_refused(tmp_path, capsys, monkeypatch):
    import dataclasses

    gpt2 = family_registry.family_named("gpt2")
    monkeypatch.setitem(family_registry._REGISTRY, "gpt2", dataclasses.replace(gpt2, bridge=None))
    tiny_gpt2(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "b", "--to", "megatron",
                   "--megatron_bridge") == 2
    assert "the gpt2 family declares no Megatron-Bridge provider (FamilySpec.bridge)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# Which MLP megatron-core builds for each layer from the layer spec a run_config.yaml names, called with the
# config as Megatron-Bridge's GPTModelProvider calls it (local modules and pipeline rank 0 here: which MLP a layer
# gets depends on neither). In a process of its own: importing megatron-core changes torch's safe-loading
# allowlist for the whole process. A spec of Megatron-Bridge's own (not installed here) fails to import.
_MLP_PER_LAYER = r"""
import importlib, sys, yaml
from megatron.core.transformer.transformer_config import TransformerConfig
model = yaml.safe_load(open(sys.argv[1]))["model"]
spec = model["transformer_layer_spec"]
module, name = spec["_target_"].rsplit(".", 1)
fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
          "num_moe_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk",
          "moe_shared_expert_intermediate_size", "gated_linear_unit", "normalization")
config = TransformerConfig(**{field: model[field] for field in fields if model.get(field) is not None})
block = getattr(importlib.import_module(module), name)(config, use_transformer_engine=False, pp_rank=0)
print(" ".join(layer.submodules.mlp.module.__name__ for layer in block.layer_specs))
"""


@pytest.mark.parametrize("variant", ["qwen2_moe_sparse_step", "deepseek_v3_moe_halves_tied"])
def test_bridge_layer_spec_builds_dense_layers_where_the_model_has_them(tmp_path, variant):
    """Megatron-Bridge builds the model from run_config.yaml's layer spec: its GPT provider's default spec gives
    every layer experts, so a model with dense layers among expert layers must name megatron-core's block spec."""
    KIT[variant].build(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "b", "--to", "megatron",
                   "--megatron_bridge") == 0
    layers = json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"]
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as hf:
        expert_layers = {int(key.split(".")[2]) for key in hf.keys() if ".mlp.experts." in key}
    expected = " ".join("MoELayer" if layer in expert_layers else "MLP" for layer in range(layers))
    run_config = tmp_path / "b" / "iter_0000000" / "run_config.yaml"
    built = subprocess.run([sys.executable, "-c", _MLP_PER_LAYER, run_config], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert built.stdout.split() == expected.split() and "MLP" in expected and "MoELayer" in expected
