"""gpt-oss beyond the family kit: MXFP4 sources, and the experts' down_proj biases in megatron-core.

The model: gpt-oss with a square ``down_proj`` per expert (ffn = hidden = 64, as in the released models, so only
logits tell its orientation), nonzero expert biases, its experts stored in MXFP4 with random blocks and scales.
The reference is transformers' own dequantized model of that checkpoint (``Mxfp4Config(dequantize=True)``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from checkpoint_convert.formats import mxfp4
from tests.family_kit import GPT_OSS, hf_model
from tests.helpers import TOKENS, assert_logits_close, convert, logits_of

ORACLE = Path(__file__).with_name("megatron_oracle.py")
QUANTIZED = ("gate_up_proj", "down_proj")
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def mxfp4_copy(dense: Path, out: Path, seed: int = 0) -> None:
    """``dense``'s checkpoint with its experts replaced by random MXFP4 blocks and scales (2^-7 .. 2^-3), as the
    released gpt-oss checkpoints store them: [experts, out features, in features / 32, 16] and [..., in / 32]."""
    state, generator = load_file(dense / "model.safetensors"), torch.Generator().manual_seed(seed)
    for name in [name for name in state if name.endswith(QUANTIZED)]:
        experts, features_in, features_out = state.pop(name).shape
        groups = (experts, features_out, features_in // 32)
        state[name + "_blocks"] = torch.randint(0, 256, (*groups, 16), dtype=torch.uint8, generator=generator)
        state[name + "_scales"] = torch.randint(120, 125, groups, dtype=torch.uint8, generator=generator)
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (out / "config.json").write_text(json.dumps(config))


def transformers_dequantized(path: Path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """(the MXFP4 checkpoint, transformers' logits of it)."""
    root = tmp_path_factory.mktemp("gpt_oss")
    hf_model("GptOssConfig", "GptOssForCausalLM", 13, **{**GPT_OSS, "intermediate_size": 64})(root / "dense")
    mxfp4_copy(root / "dense", root / "mxfp4")
    return root / "mxfp4", logits_of(transformers_dequantized(root / "mxfp4"))


def test_dequantized_bit_for_bit_as_transformers(source):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(source[0] / "model.safetensors")
    for name in [name[:-len("_blocks")] for name in state if name.endswith("_blocks")]:
        blocks, scales = state[name + "_blocks"], state[name + "_scales"]
        for dtype in (torch.bfloat16, torch.float32):
            ours = mxfp4.dequantize(blocks, scales, dtype)
            theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs), name


def test_mxfp4_source_to_hf_gives_transformers_logits(source, tmp_path):
    assert convert("--load_path", source[0], "--save_path", tmp_path / "hf", "--to", "hf",
                   "--target_params_dtype", "fp32") == 0
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert_logits_close(logits_of(tmp_path / "hf"), source[1])


# tree -> (conversion flags, megatron-core's TP and EP); all from the MXFP4 source, in float32
LAYOUTS = {"te_tp1": ([], 1, 1),
           "ep2pp2": (["--target_expert_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2",
                       "--transformer_impl", "local"], 1, 2),
           "tp2": (["--target_tensor_model_parallel_size", "2", "--transformer_impl", "local"], 2, 1),
           "bridge": (["--megatron_bridge", "--transformer_impl", "local"], 1, 1)}


@pytest.fixture(scope="module")
def megatron_core(source, tmp_path_factory) -> Path:
    """The source converted to every layout of :data:`LAYOUTS`, and megatron-core's logits of each (one batch of
    four processes); the Megatron-Bridge tree loses its Megatron-LM tracker, so only run_config.yaml describes it."""
    root = tmp_path_factory.mktemp("gpt_oss_megatron")
    torch.save(TOKENS, root / "tokens.pt")
    jobs = []
    for name, (flags, tp, ep) in LAYOUTS.items():
        assert convert("--load_path", source[0], "--save_path", root / name, "--to", "megatron",
                       "--target_params_dtype", "fp32", *flags) == 0
        kind = "dist-logits" if name == "bridge" else "logits"
        jobs.append(dict(kind=kind, name=name, ckpt=str(root / name), tokens=str(root / "tokens.pt"),
                         out=str(root / f"{name}.pt"), tp=tp, ep=ep))
    (root / "bridge" / "latest_checkpointed_iteration.txt").unlink()
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ORACLE), "batch", root / "jobs.json", "4"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.mark.parametrize("tree", ["te_tp1", "ep2pp2", "bridge"])
def test_mxfp4_source_in_megatron_core(source, megatron_core, tree):
    """MXFP4 -> Megatron: megatron-core's logits are transformers' (the square down_proj the right way round)."""
    assert_logits_close(torch.load(megatron_core / f"{tree}.pt"), source[1], atol=2e-5)


def test_megatron_core_adds_expert_down_biases_once_per_tensor_parallel_rank(source, megatron_core):
    """At TP2 megatron-core 0.16.1 adds each expert's down_proj bias on both tensor-parallel ranks before summing
    their outputs: its logits are exactly those of the Hugging Face model with those biases doubled. Our TP2 tree
    holds the biases once (it converts back to the original)."""
    doubled = transformers_dequantized(source[0])
    with torch.no_grad():
        for layer in doubled.model.layers:
            layer.mlp.experts.down_proj_bias.mul_(2)
    tp2 = torch.load(megatron_core / "tp2.pt")
    assert_logits_close(tp2, logits_of(doubled), atol=2e-5)
    assert (tp2 - source[1]).abs().max() > 100 * 2e-5
    out = megatron_core / "tp2_hf"
    assert convert("--load_path", megatron_core / "tp2", "--save_path", out, "--to", "hf") == 0
    assert_logits_close(logits_of(out), source[1])


def test_megatron_bridge_provider(source, megatron_core, tmp_path):
    """Megatron-Bridge's GPTOSSProvider with gpt-oss's fields as its own bridge sets them, a 4-token window as
    megatron-core's (3, 0); read back to Hugging Face from run_config.yaml alone."""
    model = yaml.safe_load((megatron_core / "bridge" / "iter_0000000" / "run_config.yaml").read_text())["model"]
    assert model["_target_"] == "megatron.bridge.models.gpt_oss.gpt_oss_provider.GPTOSSProvider"
    assert model["softmax_type"] == "learnable"
    assert (model["glu_linear_offset"], model["activation_func_clamp_value"]) == (1.0, 1.0)
    assert model["activation_func"]["_target_"] == "megatron.core.fusions.fused_bias_geglu.quick_gelu"
    assert model["window_size"] == [3, 0] and model["window_attn_skip_freq"] == [1, 0, 1, 0]
    assert model["position_embedding_type"] == "yarn" and model["yarn_correction_range_round_to_int"] is False
    assert convert("--load_path", megatron_core / "bridge", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), source[1])


def test_mxfp4_blocks_without_scales_refused(source, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(source[0], broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    assert convert("--load_path", broken, "--save_path", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "down_proj_blocks" in err and str(broken) in err
    assert not (tmp_path / "out").exists()


def test_sigmoid_gain_megatron_core_cannot_express_refused(source, tmp_path, capsys):
    """megatron-core's quick_gelu fixes the sigmoid's gain at 1.702: another ``swiglu_alpha`` is refused in one line."""
    other = tmp_path / "alpha"
    shutil.copytree(source[0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "swiglu_alpha": 1.5}))
    assert convert("--load_path", other, "--save_path", tmp_path / "out", "--to", "megatron") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "swiglu_alpha is 1.5" in err and not (tmp_path / "out").exists()
