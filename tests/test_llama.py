"""Llama and Mistral in every direction, and the checkpoint written by Megatron-LM itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import as_virtual_pipeline, assert_logits_close, convert, logits_of, randomize

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "megatron_lm_llama"
MEGATRON_LM_TREE = FIXTURE / "megatron_core_local_tp1pp2"


def tiny_llama(path: Path, tied: bool = False, groups: int = 2, seed: int = 0, family: str = "llama", **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_class, model_class = (MistralConfig, MistralForCausalLM) if family == "mistral" else (LlamaConfig, LlamaForCausalLM)
    config = config_class(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=groups, head_dim=24, max_position_embeddings=128,
                          rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **extra)
    model = randomize(model_class(config), seed).eval()
    if extra.get("attention_bias") and not extra.get("mlp_bias"):
        with torch.no_grad():  # qkv-only bias (Megatron's add_qkv_bias): o_proj's bias stays zero
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    built = {
        "gqa_untied": tiny_llama(root / "gqa_untied", rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3",
                                 "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}),
        "mha_tied": tiny_llama(root / "mha_tied", tied=True, groups=4, seed=1),
        "qkv_biased": tiny_llama(root / "qkv_biased", seed=4, attention_bias=True),
    }
    return {name: (root / name, model, logits_of(model)) for name, model in built.items()}


def test_megatron_lm_checkpoint_converts_to_its_hf_original(tmp_path):
    """Megatron-LM's own converter wrote this tree (local spec, TP1 PP2, tracker '1', ~700 args)."""
    before = sorted((p, p.stat().st_mtime_ns) for p in MEGATRON_LM_TREE.rglob("*"))
    assert convert("--load_path", MEGATRON_LM_TREE, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), logits_of(FIXTURE / "hf"))
    assert sorted((p, p.stat().st_mtime_ns) for p in MEGATRON_LM_TREE.rglob("*")) == before


@pytest.mark.parametrize("flags", [["--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "1"],
                                   ["--target_pipeline_layers", "1,3", "--transformer_impl", "transformer_engine"]])
def test_megatron_lm_checkpoint_reshapes(tmp_path, flags):
    assert convert("--load_path", MEGATRON_LM_TREE, "--save_path", tmp_path / "m", "--to", "megatron", *flags) == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), logits_of(FIXTURE / "hf"))


# TP2 PP2 in every naming, for every variant: the family kit (test_family_kit.py)
LAYOUTS = [
    ["--target_tensor_model_parallel_size", "1"],
    ["--target_tensor_model_parallel_size", "2", "--target_pipeline_layers", "3,1"],
    ["--target_pipeline_model_parallel_size", "2", "--megatron_format", "legacy"],
]


@pytest.mark.parametrize("flags", LAYOUTS, ids=lambda f: " ".join(f))
@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_hf_to_megatron_to_hf(models, tmp_path, flags, name):
    path, _, expected = models[name]
    assert convert("--load_path", path, "--save_path", tmp_path / "m", "--to", "megatron", *flags) == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)
    original = json.loads((path / "config.json").read_text())
    converted = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("model_type", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "sliding_window", "head_dim"):
        assert converted.get(key) == original.get(key), key


def test_reshape_tp2pp2_to_tp1_uneven(models, tmp_path):
    path, _, expected = models["gqa_untied"]
    assert convert("--load_path", path, "--save_path", tmp_path / "a", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "a", "--save_path", tmp_path / "b", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "1", "--target_pipeline_layers", "1,3") == 0
    args = torch.load(tmp_path / "b/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) == (1, 3)
    assert convert("--load_path", tmp_path / "b", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)


def _rank_files(root: Path) -> dict[str, dict]:
    return {file.parent.name: torch.load(file, weights_only=False) for file in sorted(root.rglob("model_optim_rng.pt"))}


@pytest.mark.parametrize("name", ["mha_tied", "gqa_untied"])
def test_virtual_pipeline_output_is_the_interleaved_regrouping_of_its_stages(models, tmp_path, name):
    """HF -> TP2 PP2 VPP2 holds, chunk for chunk, what TP2 PP4 holds stage for stage (regrouped by a helper
    that only moves files' dicts); reading it back gives the original logits. Tied: the output layer copy
    is in the last chunk of the last pipeline rank."""
    path, _, expected = models[name]
    layout = ["--to", "megatron", "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size"]
    assert convert("--load_path", path, "--save_path", tmp_path / "four", *layout, "4") == 0
    assert convert("--load_path", path, "--save_path", tmp_path / "vpp", *layout, "2",
                   "--target_virtual_pipeline_model_parallel_size", "2") == 0
    written, regrouped = _rank_files(tmp_path / "vpp"), _rank_files(as_virtual_pipeline(tmp_path / "four", tmp_path / "re", 2, 2))
    assert written.keys() == regrouped.keys() == {"mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"}
    for name_, state in written.items():
        assert "model" not in state and state["args"].virtual_pipeline_model_parallel_size == 2
        for chunk in ("model0", "model1"):
            ours, theirs = state[chunk], regrouped[name_][chunk]
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) if torch.is_tensor(ours[k]) else ours[k] == theirs[k] for k in ours)
    assert convert("--load_path", tmp_path / "vpp", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)


def test_uneven_virtual_pipeline_with_an_output_only_stage_reads_back(models, tmp_path, capsys):
    """Stages 2,1,1,0 over PP 2 x VPP 2: the last chunk holds no layer, only the final norm and output layer."""
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    path, _, expected = models["gqa_untied"]
    assert convert("--load_path", path, "--save_path", tmp_path / "vpp", "--to", "megatron", "--target_pipeline_layers",
                   "2,1,1,0", "--target_virtual_pipeline_model_parallel_size", "2") == 0
    last = torch.load(tmp_path / "vpp/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)["model1"]
    assert not any(".layers." in key for key in last) and "output_layer.weight" in last
    assert run_inspect_cli([str(tmp_path / "vpp"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["layers_per_stage"] == [2, 1, 1, 0]
    assert convert("--load_path", tmp_path / "vpp", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)


def test_virtual_pipeline_needs_a_pipeline_that_it_divides(models, tmp_path, capsys):
    path, _, _ = models["gqa_untied"]
    assert convert("--load_path", path, "--save_path", tmp_path / "a", "--to", "megatron",
                   "--target_virtual_pipeline_model_parallel_size", "2") == 2
    assert "needs pipeline parallel size 2 or more" in capsys.readouterr().err
    assert convert("--load_path", path, "--save_path", tmp_path / "b", "--to", "megatron",
                   "--target_pipeline_model_parallel_size", "2", "--target_virtual_pipeline_model_parallel_size", "3") == 2
    assert "PP 2 x VPP 3 = 6 stages do not divide num_layers=4" in capsys.readouterr().err
    assert convert("--load_path", path, "--save_path", tmp_path / "c", "--to", "megatron",
                   "--target_pipeline_layers", "1,1,2", "--target_virtual_pipeline_model_parallel_size", "2") == 2
    assert "lists 3 stages, not 2 model chunks for each pipeline rank" in capsys.readouterr().err
    for flag, value in [("--target_virtual_pipeline_model_parallel_size", "0"), ("--target_pipeline_layers", "5,-1")]:
        with pytest.raises(SystemExit) as stop:
            convert("--load_path", path, "--save_path", tmp_path / "d", "--to", "megatron", flag, value)
        assert stop.value.code == 2 and f"'{value}' is not a" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_bf16_round_trip_is_bit_exact(models, tmp_path):
    path, _, _ = models["gqa_untied"]
    assert convert("--load_path", path, "--save_path", tmp_path / "bf16", "--to", "hf", "--target_params_dtype", "bf16") == 0
    assert convert("--load_path", tmp_path / "bf16", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "back", "--to", "hf") == 0
    from safetensors.torch import load_file
    original, back = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(original[k], back[k]) for k in original)


def test_tp_not_dividing_query_groups_is_rejected(models, tmp_path, capsys):
    path, _, _ = models["gqa_untied"]
    assert convert("--load_path", path, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "4") == 2
    assert "tensor parallel size 4 does not divide the 2 query groups" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_family_mismatch_is_rejected(models, tmp_path, capsys):
    path, _, _ = models["gqa_untied"]
    assert convert("--load_path", path, "--save_path", tmp_path / "x", "--to", "megatron", "--model", "gpt2") == 2
    assert "does not match" in capsys.readouterr().err
    assert convert("--load_path", MEGATRON_LM_TREE, "--save_path", tmp_path / "y", "--to", "hf", "--model", "gpt2") == 2
    assert "looks like llama" in capsys.readouterr().err


def test_qkv_only_bias_is_megatron_add_qkv_bias(models, tmp_path, capsys):
    path, model, _ = models["qkv_biased"]
    assert convert("--load_path", path, "--save_path", tmp_path / "m", "--to", "megatron") == 0
    state = torch.load(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert state["args"].add_qkv_bias and not state["args"].add_bias_linear
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in state["model"]
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in state["model"]
    # an o_proj bias that is not zero cannot be represented: refused, nothing written
    from safetensors.torch import load_file, save_file
    weights = load_file(path / "model.safetensors")
    weights["model.layers.2.self_attn.o_proj.bias"][0] = 0.5
    (tmp_path / "nonzero").mkdir()
    save_file(weights, tmp_path / "nonzero" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "nonzero" / "config.json").write_text((path / "config.json").read_text())
    assert convert("--load_path", tmp_path / "nonzero", "--save_path", tmp_path / "x", "--to", "megatron") == 2
    assert "layer 2 'self_attn.o_proj.bias' is not zero" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_config_the_config_class_reads_differently_is_converted_as_the_class_reads_it(tmp_path, monkeypatch):
    """A transformers 4 config (legacy ``rope_scaling``): read as written, it has no scaling; the
    conversion, begun on that early reading, starts over with the config class's."""
    from checkpoint_convert.run import converter

    tiny_llama(tmp_path / "hf", seed=4)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    expected = logits_of(tmp_path / "hf")  # transformers applies the linear scaling
    opened = []
    original_open = converter.open_source
    monkeypatch.setattr(converter, "open_source", lambda *a: opened.append(a) or original_open(*a))
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2") == 0
    assert len(opened) == 2  # the early reading, then the config class's
    args = torch.load(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"]
    assert args.hf_rope_scaling["factor"] == 2.0 and args.rotary_base == 5000.0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)
