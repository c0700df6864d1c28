"""Multi-token prediction (MTP) layers: DeepSeek-V3's and GLM-4.5's (Hugging Face decoder layer
``num_hidden_layers``) to megatron-core's ``mtp.layers.0`` and back, in Transformer Engine and local rank files,
torch_dist and Megatron-Bridge; megatron-core computes the MTP head's logits from our output, compared with a reference forward
written here from DeepSeek-V3's definition (transformers does not run MTP layers)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli
from tests.family_kit import DEEPSEEK_V3_MOE, GLM_MOE, QWEN_ROPE, hf_model
from tests.helpers import TOKENS, assert_logits_close, convert, logits_of
from tests.test_deepseek import fp8_copy

ORACLE = Path(__file__).with_name("megatron_oracle.py")
ATOL = 2e-5
# tree -> (conversion flags, oracle job kind, TP, EP); the oracle builds megatron-core's local spec, whose multi-latent
# attention splits the down projections that Transformer Engine's copies whole: TE trees are read at TP 1
TREES = {
    "te_pp2": (["--target_pipeline_model_parallel_size", "2"], "logits", 1, 1),
    "local_tp2ep2": (["--transformer_impl", "local", "--target_tensor_model_parallel_size", "2",
                      "--target_expert_model_parallel_size", "2"], "logits", 2, 2),
    "dist": (["--megatron_ckpt_format", "torch_dist", "--transformer_impl", "local"], "dist-logits", 2, 1),
    "bridge": (["--megatron_bridge", "--transformer_impl", "local"], "dist-logits", 1, 1),
}
# model -> (builder of the original, its trees); GLM-4.5 (q/k norm, partial rotary) at TP 2 x PP 2
MODELS = {
    "deepseek_v3": (hf_model("DeepseekV3Config", "DeepseekV3ForCausalLM", 12, random_buffers=("e_score_correction_bias",),
                             q_lora_rank=24, rope_parameters=QWEN_ROPE, num_nextn_predict_layers=1, **DEEPSEEK_V3_MOE),
                    TREES),
    "glm4_moe": (hf_model("Glm4MoeConfig", "Glm4MoeForCausalLM", 16, random_buffers=("e_score_correction_bias",),
                          use_qk_norm=True, num_nextn_predict_layers=1, **GLM_MOE),
                 {"local_tp2pp2": (["--transformer_impl", "local", "--target_tensor_model_parallel_size", "2",
                                    "--target_pipeline_model_parallel_size", "2"], "logits", 2, 1)}),
}
CASES = [(model, tree) for model, (_, trees) in MODELS.items() for tree in trees]


def _with_mtp_layer(path: Path, seed: int) -> None:
    """Add an MTP layer to a saved model as DeepSeek-V3 and GLM-4.5 store it: a random expert layer as decoder layer
    num_hidden_layers, random norms and projection, and the copies of the embedding and output layer."""
    import transformers

    values = json.loads((path / "config.json").read_text())
    cfg = transformers.AutoConfig.for_model(**{**values, "num_hidden_layers": 5})
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(path / "model.safetensors")
    donor = transformers.AutoModelForCausalLM.from_config(cfg).state_dict()
    for name, tensor in donor.items():
        if name.startswith("model.layers.4."):
            scale = 0.3 if name.endswith("e_score_correction_bias") else 0.2
            tensors[name] = (1.0 if name.endswith("layernorm.weight") else 0.0) + scale * torch.randn(
                tensor.shape, generator=generator)
    hidden = cfg.hidden_size
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.4.{norm}.weight"] = 1.0 + 0.2 * torch.randn(hidden, generator=generator)
    tensors["model.layers.4.eh_proj.weight"] = 0.15 * torch.randn(hidden, 2 * hidden, generator=generator)
    tensors["model.layers.4.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.4.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def mtp_reference(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MTP head (GLM-4.5's is the same) from the Hugging Face tensors: at position i, the main model's last (normed) hidden
    state and the embedding of token i + 1, each normed (hnorm, enorm), concatenated [embedding; hidden],
    projected by eh_proj, through the decoder layer, shared_head.norm and shared_head.head (positions 0..L-2)."""
    import transformers
    from transformers.masking_utils import create_causal_mask

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, n = model.config, model.config.num_hidden_layers
    own = {name[len(f"model.layers.{n}."):]: t for name, t in load_file(path / "model.safetensors").items()
           if name.startswith(f"model.layers.{n}.")}
    layer = type(model.model.layers[-1])(cfg, n).eval()  # the model's own decoder layer (experts: n >= first dense)
    layer.load_state_dict({k: v for k, v in own.items() if k.split(".")[0] in
                           ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}, strict=True)
    eps = cfg.rms_norm_eps
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state[:, :-1]
        embedded = F.embedding(tokens[:, 1:], own["embed_tokens.weight"])
        x = torch.cat([_rms(embedded, own["enorm.weight"], eps), _rms(hidden, own["hnorm.weight"], eps)], -1)
        x = x @ own["eh_proj.weight"].t()
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions)
        x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=model.model.rotary_emb(x, positions))
        return _rms(x, own["shared_head.norm.weight"], eps) @ own["shared_head.head.weight"].t()


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory):
    """The Hugging Face original with its MTP layer, its main and MTP logits, and its conversions; megatron-core's
    logits (main and MTP, stacked) of each Megatron output, from one batch of oracle processes."""
    top = tmp_path_factory.mktemp("mtp")
    torch.save(TOKENS, top / "tokens.pt")
    jobs, expected = [], {}
    for name, (build, trees) in MODELS.items():
        root = top / name
        model = build(root / "hf")
        _with_mtp_layer(root / "hf", 13)
        expected[name] = logits_of(model), mtp_reference(root / "hf", TOKENS)
        for tree, (flags, kind, tp, ep) in trees.items():
            assert convert("--load_path", root / "hf", "--save_path", root / tree, "--to", "megatron", *flags) == 0
            jobs.append(dict(kind=kind, name=f"{name}-{tree}", ckpt=str(root / tree), tokens=str(top / "tokens.pt"),
                             out=str(root / f"{tree}.pt"), tp=tp, ep=ep))
    (top / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ORACLE), "batch", top / "jobs.json", "4"], capture_output=True,
                            text=True, timeout=600)
    return top, expected, "" if result.returncode == 0 else result.stderr[-4000:]


@pytest.fixture
def deepseek(mtp_models):
    """(DeepSeek-V3 model directory, its main and MTP logits)."""
    top, expected, _ = mtp_models
    return top / "deepseek_v3", expected["deepseek_v3"]


@pytest.mark.parametrize("model, tree", CASES)
def test_megatron_core_computes_the_mtp_head_of_our_output(mtp_models, model, tree):
    top, expected, failure = mtp_models
    assert not failure, failure
    main, mtp = expected[model]
    logits = torch.load(top / model / f"{tree}.pt")
    assert logits.shape[0] == 2, "megatron-core built no MTP layer from the args we wrote"
    assert_logits_close(logits[0], main, atol=ATOL)
    assert_logits_close(logits[1][:, :-1], mtp, atol=ATOL)  # the last position embeds a token past the end


@pytest.mark.parametrize("model, tree", CASES)
def test_mtp_layers_back_to_hugging_face(mtp_models, model, tree):
    """Megatron -> Hugging Face gives back every MTP tensor exactly (the copies from the main embedding and output
    layer) and the config's num_nextn_predict_layers."""
    top, expected, _ = mtp_models
    root, main = top / model, expected[model][0]
    out = root / f"{tree}_hf"
    assert convert("--load_path", root / tree, "--save_path", out, "--to", "hf") == 0
    original, back = load_file(root / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    layer = {name for name in original if ".layers.4." in name}
    assert {name for name in back if ".layers.4." in name} == layer
    assert all(torch.equal(back[name], original[name]) for name in layer)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert_logits_close(logits_of(out), main, atol=ATOL)


def test_a_copy_that_differs_from_the_main_tensor_is_refused(deepseek, tmp_path, capsys):
    root = deepseek[0]
    source = tmp_path / "hf"
    source.mkdir()
    for file in (root / "hf").iterdir():
        if file.name != "model.safetensors":
            (source / file.name).write_bytes(file.read_bytes())
    tensors = load_file(root / "hf" / "model.safetensors")
    tensors["model.layers.4.shared_head.head.weight"] = tensors["model.layers.4.shared_head.head.weight"] + 1
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "megatron") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'model.layers.4.shared_head.head.weight' differs from 'lm_head.weight'" in err
    assert not (tmp_path / "out").exists()


def test_drop_mtp_layers_leaves_them_out(deepseek, tmp_path):
    root, (main, _) = deepseek
    assert convert("--load_path", root / "te_pp2", "--save_path", tmp_path / "hf", "--to", "hf",
                   "--drop_mtp_layers") == 0
    assert not any(".layers.4." in name for name in load_file(tmp_path / "hf" / "model.safetensors"))
    assert_logits_close(logits_of(tmp_path / "hf"), main, atol=ATOL)


def test_inspect_shows_the_mtp_layers_and_verify_compares_them(deepseek, capsys):
    root = deepseek[0]
    capsys.readouterr()
    assert run_inspect_cli([str(root / "local_tp2ep2"), "--json", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in report["tensors"]}
    assert report["problems"] == [] and report["architecture"]["mtp_num_layers"] == 1
    assert {"mtp.layers.0.eh_proj.weight", "mtp.layers.0.transformer_layer.mlp.router.expert_bias"} <= names
    for tree in ("local_tp2ep2", "dist"):
        assert run_verify_cli([str(root / "hf"), str(root / tree)]) == 0
        assert capsys.readouterr().out.endswith("EQUAL\n")
    # --logits compares the main model's logits: transformers' model has no MTP layer to load them into
    assert run_verify_cli([str(root / "hf"), str(root / "local_tp2ep2"), "--logits"]) == 0
    assert "logits: max |diff| 0\nEQUAL" in capsys.readouterr().out


def test_later_megatron_core_mtp_model_layer_name_is_read(deepseek, tmp_path):
    """megatron-core after 0.16 names the MTP layer's transformer layer ``mtp_model_layer`` in its state dicts."""
    root = deepseek[0]
    tree = tmp_path / "renamed"
    shutil.copytree(root / "te_pp2", tree)
    last = tree / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = torch.load(last, weights_only=False)
    state["model"] = {name.replace(".transformer_layer.", ".mtp_model_layer."): value
                      for name, value in state["model"].items()}
    assert any(".mtp_model_layer." in name for name in state["model"])
    torch.save(state, last)
    assert convert("--load_path", tree, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    original, back = load_file(root / "hf" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(back[name], original[name]) for name in original if ".layers.4." in name)


def test_fp8_mtp_layers_are_dequantized(deepseek, tmp_path):
    """DeepSeek ships its MTP layer's projections in FP8 too: dequantized as every other weight."""
    root = deepseek[0]
    dequantized = fp8_copy(root / "hf", tmp_path / "fp8", 8)
    assert any(".layers.4." in name for name in dequantized)
    assert convert("--load_path", tmp_path / "fp8", "--save_path", tmp_path / "dist", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist", "--target_params_dtype", "fp32") == 0
    assert convert("--load_path", tmp_path / "dist", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(back[name], tensor) for name, tensor in dequantized.items() if ".layers.4." in name)


def test_legacy_megatron_output_is_refused(deepseek, tmp_path, capsys):
    """The legacy Megatron model has no MTP layers: refused in one line, nothing written."""
    capsys.readouterr()
    assert convert("--load_path", deepseek[0] / "hf", "--save_path", tmp_path / "out", "--to", "megatron",
                   "--megatron_format", "legacy") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multi-token prediction layers" in err and not (tmp_path / "out").exists()
