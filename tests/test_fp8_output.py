"""FP8 block-quantized Hugging Face output (``--hf_quantization fp8_block``): bf16 Megatron checkpoints of Qwen3,
DeepSeek-V3 (multi-latent attention) and DeepSeekMoE / Qwen3-MoE written as ``float8_e4m3fn`` weights with a float32
``weight_scale_inv`` per 128 x 128 block, read back by our reader and by transformers (which dequantizes on a CPU).

Tolerance against the bf16 model: E4M3 keeps 3 mantissa bits, so rounding a weight to the nearest E4M3 value after
scaling moves it by at most half a unit in the last place, 2^-4 of its magnitude (below E4M3's smallest normal
value, 2^-10 of the block's scale). Tested weight by weight, on every model. The logits then move by the compounded
effect of those independent errors over the quantized matmuls a token passes (at most 7 per layer here, 4 layers):
a dense model's relative RMS logit error must stay below 2^-4 x sqrt(matmuls) = 0.33, what independent errors of
2^-4 per matmul add up to (a random walk; not a worst-case bound, which a random tiny model's amplification makes
meaningless). Measured: Qwen3 0.137, DeepSeek-V3 (MLA) 0.206. Exactness of the format itself is tested apart: our
reader and transformers' FP8 loader, two implementations of the dequantization, agree to 1e-5 on every model
(measured: 0.0).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.family_kit import VARIANTS
from tests.helpers import assert_logits_close, convert, logits_of
from tests.test_deepseek import fp8_copy
from tests.test_errors import snapshot

VARIANT = {variant.name: variant for variant in VARIANTS}
FP8 = ("--hf_quantization", "fp8_block")
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}
MODELS = ("qwen3_gqa", "deepseek_v3_mla", "deepseek_v3_moe_halves_tied", "qwen3_moe_window", "mixtral",
          "qwen2_moe_sparse_step")
DENSE = MODELS[:2]


def test_quantizer_is_the_dequantizers_inverse():
    """On partial blocks at both ends (37 x 70 in blocks of 16): the same bytes and scales as the test builder of
    FP8 sources (``test_deepseek._quantized``, written independently), dequantized back to within half an E4M3 step;
    a block of zeros gets scale 1; the source tensor is not written."""
    from checkpoint_convert.formats.hf_io import dequantize_blocks, quantize_blocks
    from tests.test_deepseek import _quantized

    weight = torch.randn(37, 70, generator=torch.Generator().manual_seed(0))
    weight[16:32, 32:48] = 0
    kept = weight.clone()
    quantized, scale = quantize_blocks(weight, (16, 16), "w")
    expected, expected_scale = _quantized(weight, 16)
    assert torch.equal(weight, kept) and scale.shape == (3, 5) and scale[1, 2] == 1
    assert torch.equal(quantized.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale[scale != 1], expected_scale[scale != 1])
    back = dequantize_blocks(quantized, scale, (16, 16), torch.float32)
    assert ((back - weight).abs() <= 2 ** -4 * weight.abs() + 2 ** -10 * scale.max()).all()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """For each model: the Megatron bf16 checkpoint, its bf16 Hugging Face conversion and its FP8 one."""
    root = tmp_path_factory.mktemp("fp8_output")
    made = {}
    for name in MODELS:
        VARIANT[name].build(root / name)
        megatron, bf16, fp8 = root / f"{name}_megatron", root / f"{name}_bf16", root / f"{name}_fp8"
        assert convert("--load_path", root / name, "--save_path", megatron, "--to", "megatron",
                       "--target_params_dtype", "bf16") == 0
        assert convert("--load_path", megatron, "--save_path", bf16, "--to", "hf") == 0
        assert convert("--load_path", megatron, "--save_path", fp8, "--to", "hf", *FP8) == 0
        made[name] = megatron, bf16, fp8
    return root, made


def _relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("name", MODELS)
def test_fp8_output_read_by_our_reader_and_transformers(outputs, name):
    """transformers (CPU: it dequantizes, FineGrainedFP8HfQuantizer.validate_environment) and our reader (FP8 ->
    Hugging Face float32) compute the same logits; a dense model's are within FP8 tolerance of the bf16 model's.
    An expert model's are not held to it: routing is discontinuous, a token whose top-k changes with the rounding
    of the router's input gets other experts (DeepSeekMoE's grouped sigmoid top-4 of 8 here: relative RMS 0.54)."""
    root, made = outputs
    _, bf16, fp8 = made[name]
    ours = root / f"{name}_read_back"
    assert convert("--load_path", fp8, "--save_path", ours, "--to", "hf", "--target_params_dtype", "fp32") == 0
    read_by_us, read_by_transformers = logits_of(ours), logits_of(fp8)
    assert_logits_close(read_by_transformers, read_by_us, atol=1e-5)
    matmuls = 7 * 4  # per layer: q (or q down and up), kv down and up / k and v, o, gate, up, down: at most 7
    error = _relative_rms(read_by_transformers, logits_of(bf16))
    assert 0 < error <= (2 ** -4 * math.sqrt(matmuls) if name in DENSE else 1), error


_PER_EXPERT = re.compile(r"^(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_PARTS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1}  # halves of gate_up_proj; down_proj / w2: all of down_proj


def _bf16_weight(original: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The bf16 output's weight an FP8 output's tensor holds (a per-expert one: a slice of the fused tensor)."""
    match = _PER_EXPERT.match(key)
    if not match:
        return original[key]
    prefix, expert, part = match.group(1) + ".mlp.experts", int(match.group(2)), match.group(3)
    if part not in _PARTS:
        return original[f"{prefix}.down_proj"][expert]
    return original[f"{prefix}.gate_up_proj"][expert].chunk(2)[_PARTS[part]]


@pytest.mark.parametrize("name", MODELS)
def test_each_weight_within_half_an_e4m3_step(outputs, name):
    """Every FP8 weight times its block's scale is the bf16 weight to 2^-4 of its magnitude (2^-10 of the scale
    below E4M3's normal range); every block's largest value is +-448 (scale = amax / 448)."""
    _, bf16, fp8 = outputs[1][name]
    original, written = load_file(bf16 / "model.safetensors"), load_file(fp8 / "model.safetensors")
    quantized = [key for key, tensor in written.items() if tensor.dtype == torch.float8_e4m3fn]
    assert len(quantized) >= 20
    for key in quantized:
        weight, scale = written[key].float(), written[key + "_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (-(-weight.shape[0] // 128), -(-weight.shape[1] // 128))
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:weight.shape[0], :weight.shape[1]]
        exact = _bf16_weight(original, key).float()
        assert ((weight * full - exact).abs() <= 2 ** -4 * exact.abs() + 2 ** -10 * full).all(), key
        assert weight.abs().max() == 448.0


def test_layout_and_config_as_the_originals(outputs):
    """config.json's quantization_config is DeepSeek-V3's and Qwen3-8B-FP8's; embeddings, norms, routers, the expert
    bias and the output layer keep their dtype; experts are written per expert, as transformers reads FP8 experts."""
    for name in MODELS:
        fp8 = outputs[1][name][2]
        config = json.loads((fp8 / "config.json").read_text())
        skipped = {"modules_to_not_convert": ["lm_head", "mlp.shared_expert_gate"]} if "qwen2_moe" in name else {}
        assert config["quantization_config"] == {**QUANTIZATION_CONFIG, **skipped}
        written = load_file(fp8 / "model.safetensors")
        kept = {key for key, tensor in written.items() if tensor.dtype == torch.bfloat16}
        assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"} <= kept
        assert "lm_head.weight" in kept or config["tie_word_embeddings"]
        assert not [key for key in written if ".experts.gate_up_proj" in key or ".experts.down_proj" in key]
    moe = load_file(outputs[1]["deepseek_v3_moe_halves_tied"][2] / "model.safetensors")
    assert moe["model.layers.1.mlp.experts.7.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert moe["model.layers.1.mlp.experts.7.up_proj.weight_scale_inv"].shape == (1, 1)
    assert moe["model.layers.1.mlp.shared_experts.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert moe["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert moe["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    mixtral = load_file(outputs[1]["mixtral"][2] / "model.safetensors")  # as save_pretrained names them
    assert mixtral["model.layers.0.block_sparse_moe.experts.3.w3.weight"].dtype == torch.float8_e4m3fn
    qwen2_moe = load_file(outputs[1]["qwen2_moe_sparse_step"][2] / "model.safetensors")
    assert qwen2_moe["model.layers.1.mlp.shared_expert_gate.weight"].dtype == torch.bfloat16
    assert qwen2_moe["model.layers.1.mlp.shared_expert.up_proj.weight"].dtype == torch.float8_e4m3fn


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    """DeepSeek-V3 (multi-latent attention) quantized as DeepSeek ships it (``test_deepseek.fp8_copy``: scale =
    amax / 448 per block, float32) in blocks of 16: kv_a_proj_with_mqa's 24 rows end in a partial block."""
    root = tmp_path_factory.mktemp("fp8_round_trip")
    VARIANT["deepseek_v3_mla"].build(root / "original")
    fp8_copy(root / "original", root / "fp8", 16)
    return root, root / "fp8"


def _blocks(tensor: torch.Tensor, block: int) -> list[torch.Tensor]:
    rows, cols = tensor.shape
    return [tensor[r:r + block, c:c + block] for r in range(0, rows, block) for c in range(0, cols, block)]


def _compare_blocks(source: Path, output: Path) -> tuple[int, int, int, float]:
    """(blocks, blocks whose FP8 bytes are identical, blocks whose scales are identical, largest relative scale
    difference) of every scaled weight of ``source`` against ``output``."""
    before, after = load_file(source / "model.safetensors"), load_file(output / "model.safetensors")
    assert set(before) == set(after)
    total = same_bytes = same_scales = 0
    worst = 0.0
    for key in [key for key in before if key.endswith("_scale_inv")]:
        weight = key[:-len("_scale_inv")]
        pairs = zip(_blocks(before[weight].view(torch.uint8), 16), _blocks(after[weight].view(torch.uint8), 16))
        same = [torch.equal(a, b) for a, b in pairs]
        total, same_bytes = total + len(same), same_bytes + sum(same)
        same_scales += int((before[key] == after[key]).sum())
        worst = max(worst, ((after[key] - before[key]).abs() / before[key]).max().item())
    return total, same_bytes, same_scales, worst


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_source_megatron_fp8_round_trip(fp8_source, dtype):
    """FP8 DeepSeek-V3 -> Megatron -> FP8 Hugging Face reproduces the source's FP8 bytes in all 476 blocks. Through
    float32 Megatron the scales too: the block's largest weight dequantizes to fl(448 s), and fl(fl(448 s) / 448)
    is s for every s = fl(amax / 448) (0 exceptions in 20 million random amax, all 476 here). Through bf16 every
    weight is rounded to 8 significant bits (by at most 2^-8 of itself), so the scales move by as much (0.0038
    measured); each FP8 value q comes back as q (1 + e) with |e| < 2^-7, far inside half an E4M3 step (2^-4 of q),
    and rounds back to itself."""
    root, source = fp8_source
    megatron, back = root / f"megatron_{dtype}", root / f"back_{dtype}"
    assert convert("--load_path", source, "--save_path", megatron, "--to", "megatron",
                   "--target_params_dtype", dtype) == 0
    assert convert("--load_path", megatron, "--save_path", back, "--to", "hf", *FP8, "--fp8_block_size", "16,16") == 0
    total, same_bytes, same_scales, worst = _compare_blocks(source, back)
    assert (total, same_bytes) == (476, 476)
    if dtype == "fp32":
        assert same_scales == 476 and worst == 0
    else:
        assert 0 < worst <= 2 ** -8
    assert json.loads((back / "config.json").read_text())["quantization_config"]["weight_block_size"] == [16, 16]


def test_fp8_source_to_fp8_hugging_face(fp8_source):
    """Hugging Face FP8 -> FP8 keeps the source's blocks (dequantized in float32, quantized again): identical."""
    root, source = fp8_source
    assert convert("--load_path", source, "--save_path", root / "again", "--to", "hf", *FP8) == 0
    assert _compare_blocks(source, root / "again") == (476, 476, 476, 0.0)


def _refused(capsys, source: Path, out: Path, message: str, *flags: str) -> None:
    before, _ = snapshot(source), capsys.readouterr()
    assert convert("--load_path", source, "--save_path", out, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert snapshot(source) == before and not out.exists()


def test_refusals(outputs, tmp_path, capsys):
    """GPT-2 (Conv1D layers, which transformers' FP8 loader does not quantize), Megatron output, a block size without
    the quantization, and a weight holding NaN (no scale can represent it: named with its block) are refused in one
    line; the source is untouched."""
    root, made = outputs
    VARIANT["gpt2_tied"].build(tmp_path / "gpt2")
    _refused(capsys, tmp_path / "gpt2", tmp_path / "out", "quantizes no layer of GPT2LMHeadModel (its linear layers "
             "are Conv1D)", "--to", "hf", *FP8)
    _refused(capsys, made["qwen3_gqa"][1], tmp_path / "out", "--hf_quantization and --fp8_block_size quantize Hugging "
             "Face output (--to hf)", "--to", "megatron", *FP8)
    _refused(capsys, made["qwen3_gqa"][1], tmp_path / "out", "--fp8_block_size sets the blocks of --hf_quantization "
             "fp8_block, which is not given", "--to", "hf", "--fp8_block_size", "64")
    from safetensors.torch import save_file
    broken = tmp_path / "nan"
    broken.mkdir()
    tensors = load_file(made["qwen3_gqa"][1] / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][40, 70] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text((made["qwen3_gqa"][1] / "config.json").read_text())
    _refused(capsys, broken, tmp_path / "out", "'model.layers.2.mlp.down_proj.weight' holds NaN or Inf in its block "
             "(0, 0)", "--to", "hf", *FP8)


def test_warning_where_transformers_misreads_partial_blocks(outputs, tmp_path, capsys):
    """Blocks of 64: q_proj's 96 rows are a whole block and a partial one, which transformers 5.25 dequantizing on a
    CPU reads as two blocks of 48 (the side over the scale grid), as it does q, o, gate, up and down in every layer:
    said in one warning; our reader reads them."""
    megatron, bf16, _ = outputs[1]["qwen3_gqa"]
    fp8, back = tmp_path / "fp8", tmp_path / "back"
    assert convert("--load_path", megatron, "--save_path", fp8, "--to", "hf", *FP8, "--fp8_block_size", "64,64") == 0
    assert "'model.layers.0.self_attn.q_proj.weight' and 19 more end in partial 64 x 64 blocks after whole ones, " \
           "which transformers' CPU dequantization (dequantize=True) misreads" in capsys.readouterr().err
    assert convert("--load_path", fp8, "--save_path", back, "--to", "hf", "--target_params_dtype", "fp32") == 0
    error = _relative_rms(logits_of(back), logits_of(bf16))
    assert 0 < error <= 2 ** -4 * math.sqrt(7 * 4), error


def test_dry_run_predicts_the_fp8_files(outputs, tmp_path):
    """The dry run sizes the FP8 shard, its scales and config.json to the byte."""
    from checkpoint_convert.run.converter import Options
    from checkpoint_convert.run.dry_run import plan_report

    megatron, _, fp8 = outputs[1]["deepseek_v3_moe_halves_tied"]
    report = plan_report(Options(load_path=megatron, save_path=tmp_path / "out", to="hf", hf_quantization="fp8_block"))
    sizes = {entry["path"]: entry["bytes"] for entry in report["files"]}
    for name in ("model.safetensors", "config.json"):
        assert sizes[name] == (fp8 / name).stat().st_size, name
    assert report["tensor_bytes"] == sum(t.nbytes for t in load_file(fp8 / "model.safetensors").values())
    assert report["target"]["format"] == "huggingface safetensors fp8_block"
    assert json.loads((fp8 / "conversion.json").read_text())["target"]["format"] == "huggingface safetensors fp8_block"


def test_inspect_shows_the_quantization(outputs, capsys):
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    fp8 = outputs[1]["qwen3_gqa"][2]
    assert run_inspect_cli([str(fp8), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"] == {**QUANTIZATION_CONFIG, "scaled_weights": 28}
    assert report["dtypes"] == ["bfloat16", "float32", "float8_e4m3fn"]
    assert run_inspect_cli([str(fp8)]) == 0
    assert "quantization: activation_scheme=dynamic  fmt=e4m3  quant_method=fp8  weight_block_size=[128, 128]  " \
           "scaled_weights=28" in capsys.readouterr().out


def test_quantizing_does_not_depend_on_torch_default_dtype():
    """Scales are computed in float32 whatever torch's default dtype a library of the same process has set."""
    from checkpoint_convert.formats.hf_io import quantize_blocks

    weight = torch.randn(40, 72, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = quantize_blocks(weight, (16, 16), "w")
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        got = quantize_blocks(weight, (16, 16), "w")
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0].view(torch.uint8), expected[0].view(torch.uint8))
