"""DeepSeek beyond the family kit: FP8 block-quantized sources, the down projections' tensor-parallel layout per
key schema, expert layers from Megatron-LM's args, older per-expert layouts, the expert bias's dtype, multi-token
prediction layers, and the routing megatron-core cannot compute, refused.

The kit (``tests/family_kit.py``: ``deepseek_v3_mla``, ``deepseek_v3_moe_halves_tied``, ``deepseek_v2_moe``) runs
multi-latent attention and DeepSeekMoE through every direction and layout with megatron-core's logits.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.family_kit import VARIANTS
from tests.helpers import assert_logits_close, convert, logits_of, per_expert_layout, stored_names, with_args
from tests.test_errors import snapshot

VARIANT = {variant.name: variant for variant in VARIANTS}
E4M3_MAX = 448.0


def _quantized(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 ``weight_scale_inv``): each block x block tile scaled so its largest value is
    E4M3's largest (the last tiles of a side not a multiple of ``block`` are partial)."""
    rows, cols = weight.shape
    grid = (-(-rows // block), -(-cols // block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = weight
    tiles = padded.reshape(grid[0], block, grid[1], block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    quantized = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized, scale


def reference_dequantized(quantized: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """The format's definition, written here independently: element (i, j) times scale[i // block, j // block]."""
    rows, cols = quantized.shape
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)[:rows, :cols]
    return quantized.float() * full


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight")) and ".layers." in name


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """A tiny DeepSeek-V3 quantized the way DeepSeek ships V3 (FP8 E4M3 weights, one float32 scale per block),
    with blocks of 8 (every side a multiple) and 16 (kv_a_proj_with_mqa's 24 rows end in a partial block);
    for each: the directory and the logits of the original model holding the reference dequantization."""
    root = tmp_path_factory.mktemp("fp8")
    model = VARIANT["deepseek_v3_mla"].build(root / "original")
    made = {}
    for block in (8, 16):
        path = root / f"fp8_block{block}"
        model.load_state_dict(fp8_copy(root / "original", path, block), strict=False)
        made[block] = path, logits_of(model)
    return root, made


def fp8_copy(original: Path, path: Path, block: int) -> dict[str, torch.Tensor]:
    """Save ``original`` (a single-file Hugging Face model) at ``path`` quantized as DeepSeek ships V3: FP8
    weights with ``weight_scale_inv`` per block and a ``quantization_config``; returns the reference
    dequantization of every quantized weight (what a converter must compute from the copy)."""
    stored, dequantized = {}, {}
    for name, tensor in load_file(original / "model.safetensors").items():
        if _is_quantized(name, tensor):
            stored[name], stored[name + "_scale_inv"] = _quantized(tensor, block)
            dequantized[name] = reference_dequantized(stored[name], stored[name + "_scale_inv"], block)
        else:
            stored[name] = tensor
    path.mkdir()
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((original / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.mark.parametrize("block", [8, 16])
def test_fp8_source_dequantizes_while_streaming(fp8_models, block):
    """FP8 -> Megatron (fp32) -> Hugging Face computes the logits of the reference dequantization; no scale
    reaches the output; without --target_params_dtype the dequantized weights come out bf16."""
    root, made = fp8_models
    path, expected = made[block]
    megatron, back = root / f"megatron{block}", root / f"back{block}"
    assert convert("--load_path", path, "--save_path", megatron, "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_params_dtype", "fp32") == 0
    assert convert("--load_path", megatron, "--save_path", back, "--to", "hf") == 0
    assert_logits_close(logits_of(back), expected)
    written = load_file(back / "model.safetensors")
    assert not [name for name in written if "scale" in name]
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert convert("--load_path", path, "--save_path", root / f"bf16_{block}", "--to", "megatron") == 0
    rank = torch.load(root / f"bf16_{block}" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    kv_down = rank["model"]["decoder.layers.0.self_attention.linear_kv_down_proj.weight"]
    assert kv_down.dtype == torch.bfloat16  # this test model's other tensors are float32 (DeepSeek's are bf16)


def test_partial_blocks_on_both_sides():
    """Rows and columns that are not multiples of the block: the last blocks are partial, as defined."""
    from checkpoint_convert.formats.hf_io import dequantize_blocks

    weight = torch.randn(37, 70, generator=torch.Generator().manual_seed(0))
    quantized, scale = _quantized(weight, 16)
    expected = reference_dequantized(quantized, scale, 16)
    assert torch.equal(dequantize_blocks(quantized, scale, (16, 16), torch.float32), expected)


def test_inspect_shows_fp8_as_stored(fp8_models, capsys):
    """inspect lists FP8 weights and their scales as the files hold them; --check reads every one, dequantized."""
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    path, _ = fp8_models[1][16]
    assert run_inspect_cli([str(path), "--json", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtypes"] == ["float32", "float8_e4m3fn"] and report["problems"] == []
    assert report["bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors")) - _header_bytes(path)


def _header_bytes(path: Path) -> int:
    file = path / "model.safetensors"
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_fp8_dequantization_agrees_with_transformers(fp8_models):
    """Where every side is a multiple of the block, transformers' own FP8 loader (``dequantize=True``) reads
    the same model: its logits are the reference's."""
    import transformers

    root, made = fp8_models
    path, expected = made[8]
    quantization = transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=(8, 8))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                              dtype=torch.float32)
    assert_logits_close(logits_of(model), expected)


def test_down_projections_per_schema(tmp_path):
    """megatron-core splits the down projections over TP ranks in its local spec (ColumnParallelLinear) and
    keeps a whole copy per rank under Transformer Engine (TELinear, parallel_mode "duplicated"), which also
    fuses the latent norms into the up projections and keeps the input norm apart."""
    source = tmp_path / "hf"
    VARIANT["deepseek_v3_mla"].build(source)
    shapes = {}
    for impl in ("local", "transformer_engine"):
        out = tmp_path / impl
        assert convert("--load_path", source, "--save_path", out, "--to", "megatron", "--transformer_impl", impl,
                       "--target_tensor_model_parallel_size", "2") == 0
        state = torch.load(out / "release" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)["model"]
        shapes[impl] = {key.split("layers.0.", 1)[1]: tuple(value.shape) for key, value in state.items()
                        if "layers.0." in key and value is not None}
    assert shapes["local"]["self_attention.linear_q_down_proj.weight"] == (16, 64)
    assert shapes["local"]["self_attention.linear_kv_down_proj.weight"] == (12, 64)
    assert shapes["local"]["self_attention.q_layernorm.weight"] == (32,)
    te = shapes["transformer_engine"]
    assert te["self_attention.linear_q_down_proj.weight"] == (32, 64)
    assert te["self_attention.linear_kv_down_proj.weight"] == (24, 64)
    assert te["self_attention.linear_q_up_proj.layer_norm_weight"] == (32,)
    assert te["self_attention.linear_kv_up_proj.layer_norm_weight"] == (16,)
    assert te["input_layernorm.weight"] == (64,) and "self_attention.q_layernorm.weight" not in te


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """The kit's DeepSeekMoE variants (V3 and V2 routing): Hugging Face, their logits, and Megatron TP1 rank files."""
    root = tmp_path_factory.mktemp("deepseek_moe")
    made = {}
    for name in ("deepseek_v3_moe_halves_tied", "deepseek_v2_moe"):
        expected = logits_of(VARIANT[name].build(root / name))
        assert convert("--load_path", root / name, "--save_path", root / f"{name}_megatron", "--to", "megatron") == 0
        made[name] = root / name, root / f"{name}_megatron", expected
    return made


def _refused(capsys, source: Path, out: Path, message: str, file: str, *flags: str) -> None:
    before, _ = snapshot(source), capsys.readouterr()
    to = "megatron" if file == "config.json" else "hf"
    assert convert("--load_path", source, "--save_path", out, "--to", to, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and file in err and "\n" not in err, err
    assert snapshot(source) == before and not out.exists()


@pytest.mark.parametrize("name, changes, message", [
    ("deepseek_v3_moe_halves_tied", {"num_experts_per_tok": 2},
     "num_experts_per_tok 2 with topk_group 2: transformers' DeepseekV3 router ranks groups by their best 2 scores, "
     "megatron-core by their best num_experts_per_tok // topk_group = 1"),
    ("deepseek_v3_moe_halves_tied", {"norm_topk_prob": False}, "norm_topk_prob is False with num_experts_per_tok 4: "
     "megatron-core's sigmoid router renormalises the weights exactly when it chooses more than one expert"),
    ("deepseek_v3_moe_halves_tied", {"moe_layer_freq": 2}, "moe_layer_freq is 2: transformers' DeepSeek models have"),
    ("deepseek_v3_moe_halves_tied", {"n_shared_experts": 3}, "n_shared_experts is 3, but the tensors fit "
                                                             "n_shared_experts=2"),
    ("deepseek_v3_moe_halves_tied", {"n_shared_experts": 0}, "n_shared_experts is 0, not a whole number of at least 1"),
    ("deepseek_v2_moe", {"topk_method": "noaux_tc"}, "topk_method is 'noaux_tc', not one transformers' DeepseekV2 "
                                                     "router computes (greedy, group_limited_greedy)"),
    ("deepseek_v2_moe", {"num_experts_per_tok": 4}, "ranks groups by their best 1 score, megatron-core by their best "
                                                    "num_experts_per_tok // topk_group = 2"),
    ("deepseek_v2_moe", {"norm_topk_prob": True}, "norm_topk_prob is true, but transformers' DeepseekV2 router never "
                                                  "renormalises"),
], ids=["v3-group-ranking", "v3-not-renormalised", "moe-layer-freq", "shared-size", "no-shared", "v2-topk-method",
        "v2-group-ranking", "v2-renormalised"])
def test_routing_megatron_core_cannot_compute_is_refused(moe_models, tmp_path, capsys, name, changes, message):
    source = shutil.copytree(moe_models[name][0], tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **changes}))
    _refused(capsys, source, tmp_path / "out", message, "config.json")


@pytest.mark.parametrize("name, changes, message", [
    ("deepseek_v3_moe_halves_tied", {"moe_router_group_topk": 1}, "megatron-core by their best num_experts_per_tok "
                                                                  "// topk_group = 4"),
    ("deepseek_v3_moe_halves_tied", {"moe_router_group_topk": 3, "moe_router_num_groups": 3},
     "moe_router_group_topk 3 needs moe_router_num_groups (now 3) dividing the 8 experts"),
    ("deepseek_v2_moe", {"moe_router_pre_softmax": False}, "the router (softmax scores, pre-softmax False) is not a "
                                                           "deepseek_v2 router"),
    ("deepseek_v2_moe", {"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias with "
                                                                 "moe_router_score_function softmax"),
], ids=["v3-group-ranking", "groups-not-dividing", "v2-renormalised", "softmax-expert-bias"])
def test_megatron_routing_no_deepseek_router_computes_is_refused(moe_models, tmp_path, capsys, name, changes, message):
    source = with_args(moe_models[name][1], tmp_path / "src", **changes)
    _refused(capsys, source, tmp_path / "out", message, "model_optim_rng.pt")


def test_dense_layers_must_come_first(moe_models, tmp_path, capsys):
    """A Megatron model whose dense layers are not the first ones has no DeepSeek config (first_k_dense_replace)."""
    source = moe_models["deepseek_v3_moe_halves_tied"][1]
    tree = with_args(source, tmp_path / "src", moe_layer_freq=[1, 0, 1, 1])
    rank_file = tree / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    model = state["model"]
    layer0 = {k: v for k, v in model.items() if k.startswith("decoder.layers.0.")}
    layer1 = {k: v for k, v in model.items() if k.startswith("decoder.layers.1.")}
    for key in (*layer0, *layer1):
        del model[key]
    model.update({k.replace("layers.0.", "layers.1."): v for k, v in layer0.items()})
    model.update({k.replace("layers.1.", "layers.0."): v for k, v in layer1.items()})
    torch.save(state, rank_file)
    _refused(capsys, tree, tmp_path / "out", "expert layers [1, 0, 1, 1]: a DeepSeek model has its dense layers first",
             "model_optim_rng.pt")


@pytest.mark.parametrize("name", ["deepseek_v3_moe_halves_tied", "deepseek_v2_moe"])
def test_megatron_lm_args_of_expert_layers_without_our_records(moe_models, tmp_path, name):
    """Megatron-LM's args (no ``hf_extra_config``, ``hf_family``): the router tells V3 (sigmoid) from V2 (softmax),
    and the expert layers' config keys are spelled from megatron-core's fields, with the original's logits."""
    hf, megatron, expected = moe_models[name]
    tree = shutil.copytree(megatron, tmp_path / "megatron")
    rank_file = tree / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    for field in ("hf_rope_scaling", "hf_extra_config", "hf_family"):
        delattr(state["args"], field)
    torch.save(state, rank_file)
    assert convert("--load_path", tree, "--save_path", tmp_path / "back", "--to", "hf") == 0
    config, original = (json.loads((path / "config.json").read_text()) for path in (tmp_path / "back", hf))
    keys = ("model_type", "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
            "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "topk_method")
    assert {key: config.get(key) for key in keys} == {key: original.get(key) for key in keys}
    assert_logits_close(logits_of(tmp_path / "back"), expected)


def test_greedy_v2_router_and_older_per_expert_layout(moe_models, tmp_path):
    """DeepSeek-V2-Lite's router (``topk_method: greedy``, one group) with the experts stored one by one
    (``mlp.experts.E.{gate,up,down}_proj``, as DeepSeek's own checkpoints and older transformers hold them)."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "greedy"
    config = json.loads((moe_models["deepseek_v2_moe"][0] / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(moe_models["deepseek_v2_moe"][0], dtype=torch.float32)
    model.config.topk_method, model.config.n_group, model.config.topk_group = "greedy", 1, 1
    for layer in model.model.layers[1:]:
        layer.mlp.gate.topk_method = "greedy"
    model.save_pretrained(source)
    old = per_expert_layout(source, tmp_path / "old", {}, "gate_proj", "up_proj", "down_proj")
    assert "model.layers.3.mlp.experts.7.up_proj.weight" in stored_names(old)
    assert convert("--load_path", old, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2", "--target_tensor_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["topk_method"], written["n_group"], written["topk_group"]) == ("greedy", 1, 1)
    assert config["topk_method"] == "group_limited_greedy"
    assert_logits_close(logits_of(tmp_path / "hf"), logits_of(model))


def test_expert_bias_stays_float32(moe_models, tmp_path):
    """megatron-core keeps ``router.expert_bias`` in float32 (and transformers ``e_score_correction_bias``): a bf16
    conversion keeps it so, on both sides."""
    hf, _, _ = moe_models["deepseek_v3_moe_halves_tied"]
    assert convert("--load_path", hf, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_params_dtype", "bf16") == 0
    model = torch.load(tmp_path / "m" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    assert model["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert model["decoder.layers.1.mlp.router.weight"].dtype == torch.bfloat16
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert written["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(written["model.layers.1.mlp.gate.e_score_correction_bias"],
                       load_file(hf / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_incomplete_mtp_layers_are_refused_or_left_out_when_asked(tmp_path, capsys):
    """DeepSeek-V3 stores its multi-token prediction layer as decoder layer num_hidden_layers (enorm, hnorm,
    eh_proj, shared_head, embed_tokens and a whole decoder layer; converted in tests/test_mtp.py): one without its
    embed_tokens is refused with one line naming it, or left out with a warning when asked."""
    model = VARIANT["deepseek_v3_moe_halves_tied"].build(tmp_path / "hf")  # V3's MTP layer is an expert layer
    expected = logits_of(model)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    mtp = {name.replace("layers.3.", "layers.4."): tensor.clone() for name, tensor in tensors.items()
           if name.startswith("model.layers.3.")}
    mtp.update({"model.layers.4.enorm.weight": torch.ones(64), "model.layers.4.hnorm.weight": torch.ones(64),
                "model.layers.4.eh_proj.weight": torch.zeros(64, 128),
                "model.layers.4.shared_head.head.weight": torch.zeros(1000, 64),
                "model.layers.4.shared_head.norm.weight": torch.ones(64)})
    save_file({**tensors, **mtp}, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "refused", "--to", "megatron") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'model.layers.4.embed_tokens.weight' is missing" in err
    assert not (tmp_path / "refused").exists()
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "megatron", "--to", "megatron",
                   "--drop_mtp_layers") == 0
    assert f"left out {len(mtp)} tensors of multi-token prediction layers" in capsys.readouterr().err
    assert convert("--load_path", tmp_path / "megatron", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)


def test_megatron_lm_args_without_our_records(tmp_path):
    """Args as Megatron-LM writes them (no ``hf_rope_scaling``, ``hf_extra_config`` or ``hf_family``): the YaRN
    scaling is read back from MLA's own fields (``rope_type``, ``rotary_scaling_factor``, ``mscale``...) and the
    model is DeepSeek-V3's, with its logits."""
    model = VARIANT["deepseek_v3_mla"].build(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "megatron", "--to", "megatron") == 0
    rank_file = tmp_path / "megatron" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    for name in ("hf_rope_scaling", "hf_extra_config", "hf_family"):
        delattr(state["args"], name)
    torch.save(state, rank_file)
    assert convert("--load_path", tmp_path / "megatron", "--save_path", tmp_path / "back", "--to", "hf") == 0
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_parameters"]["rope_type"] == "yarn"
    assert_logits_close(logits_of(tmp_path / "back"), logits_of(model))


def test_megatron_sigmoid_router_without_expert_bias(moe_models, tmp_path):
    """A Megatron sigmoid router without expert bias is DeepSeek-V3's with ``e_score_correction_bias`` zero."""
    from transformers import AutoModelForCausalLM

    hf, megatron, _ = moe_models["deepseek_v3_moe_halves_tied"]
    tree = with_args(megatron, tmp_path / "src", moe_router_enable_expert_bias=False)
    rank_file = tree / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    state["model"] = {key: value for key, value in state["model"].items() if not key.endswith("router.expert_bias")}
    torch.save(state, rank_file)
    assert convert("--load_path", tree, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    written = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert written.dtype == torch.float32 and not written.any()
    assert_logits_close(logits_of(tmp_path / "hf"), logits_of(model))


def _fp8_variant(fp8_models, tmp_path, rename: dict[str, str], keep_quantization_config: bool = True) -> Path:
    """A copy of the block-16 FP8 source with tensors renamed (and its quantization_config dropped, if asked)."""
    path, _ = fp8_models[1][16]
    copy = tmp_path / "fp8"
    copy.mkdir()
    tensors = load_file(path / "model.safetensors")
    save_file({rename.get(name, name): tensor for name, tensor in tensors.items()}, copy / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    if not keep_quantization_config:
        del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_fp8_weight_without_its_scale_is_refused(fp8_models, tmp_path, capsys):
    """A block-quantized weight whose scale is missing (found by tests/test_fuzz.py: one byte of the header
    flipped in a scale's name) would convert as its raw FP8 values: every command refuses it."""
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    name = "model.layers.3.self_attn.o_proj.weight"
    copy = _fp8_variant(fp8_models, tmp_path, {f"{name}_scale_inv": f"{name}_scaQe_inv"})
    before = snapshot(copy)
    assert convert("--load_path", copy, "--save_path", tmp_path / "out", "--to", "megatron") == 2
    assert run_inspect_cli([str(copy), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"'{name}' is torch.float8_e4m3fn without its '{name}_scale_inv'" in line
                                 for line in err), err
    assert snapshot(copy) == before and not (tmp_path / "out").exists()


def test_inspect_check_reads_unscaled_fp8_weights(fp8_models, tmp_path, capsys):
    """FP8 weights stored plainly (no quantization_config, no scales: the values are the weights) are read and
    checked for NaN like any other; torch has no min/max kernel for FP8."""
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    path, _ = fp8_models[1][16]
    scales = [name for name in load_file(path / "model.safetensors") if name.endswith("_scale_inv")]
    copy = _fp8_variant(fp8_models, tmp_path, {name: name.replace("_scale_inv", "_scale_gone") for name in scales},
                        keep_quantization_config=False)
    assert run_inspect_cli([str(copy), "--check", "--json"]) == 3  # the renamed scales: tensors no rule reads
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] and all("no conversion rule reads this tensor" in p for p in report["problems"])
