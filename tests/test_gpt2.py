"""GPT-2 in every direction, proven by the logits of the converted model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers import (as_virtual_pipeline, assert_logits_close, convert, logits_of, reference_megatron_gpt2,
                           tiny_gpt2)
from checkpoint_convert.commands.report_cli import run_inspect_cli


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "hf"
    model = tiny_gpt2(path)
    return path, model, logits_of(model)


@pytest.fixture(scope="module")
def gpt2_untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2u") / "hf"
    model = tiny_gpt2(path, tied=False, seed=1, activation="gelu")
    return path, model, logits_of(model)


MEGATRON_LAYOUTS = [
    dict(tp=1, pp=1, version=3.0, schema="legacy"),
    dict(tp=2, pp=1, version=3.0, schema="legacy"),
    dict(tp=1, pp=2, version=3.0, schema="legacy"),
    dict(tp=2, pp=2, version=3.0, schema="legacy"),
    dict(tp=2, pp=2, version=2.0, schema="legacy", old_names=True),
    dict(tp=2, pp=1, version=1.0, schema="legacy"),
    dict(tp=2, pp=1, version=0.0, schema="legacy"),
    dict(tp=2, pp=2, version=0.0, schema="legacy", old_names=True),
    dict(tp=2, pp=2, version=3.0, schema="transformer_engine"),
    dict(tp=2, pp=2, version=3.0, schema="local"),
    dict(tp=1, pp=2, version=3.0, schema="local", stages=[3, 1], iteration=1),
]


@pytest.mark.parametrize("layout", MEGATRON_LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_megatron_to_hf_matches_original_logits(gpt2, tmp_path, layout):
    hf, model, expected = gpt2
    source = reference_megatron_gpt2(model, tmp_path / "megatron", **layout)
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "out"), expected)


def test_untied_megatron_tp2_pp2_to_hf(gpt2_untied, tmp_path):
    hf, model, expected = gpt2_untied
    source = reference_megatron_gpt2(model, tmp_path / "megatron", tp=2, pp=2, schema="local")
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "hf") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["activation_function"] == "gelu"
    assert_logits_close(logits_of(tmp_path / "out"), expected)


def test_virtual_pipeline_tree_to_hf_and_reshaped(tmp_path, capsys):
    """PP 2 x VPP 2 (model0/model1 in every rank file) with uneven chunks: stages follow Megatron's order.
    Reshaping TP keeps the virtual pipeline and its uneven stages; VPP 1 gives plain rank files."""
    model = tiny_gpt2(None, layers=6, seed=2)
    expected = logits_of(model)
    stages = reference_megatron_gpt2(model, tmp_path / "four", tp=2, pp=4, stages=[2, 1, 1, 2])
    source = as_virtual_pipeline(stages, tmp_path / "vpp", pp=2, vpp=2)
    assert run_inspect_cli([str(source), "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert (layout["pp"], layout["vpp"], layout["layers_per_stage"]) == (2, 2, [2, 1, 1, 2])
    assert convert("--load_path", source, "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)

    assert convert("--load_path", source, "--save_path", tmp_path / "tp1", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "1") == 0
    args = torch.load(tmp_path / "tp1/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.virtual_pipeline_model_parallel_size, args.pipeline_model_parallel_layout) == (2, "Ett|t|t|ttL")
    assert run_inspect_cli([str(tmp_path / "tp1"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["layers_per_stage"] == [2, 1, 1, 2]

    assert convert("--load_path", tmp_path / "tp1", "--save_path", tmp_path / "plain", "--to", "megatron",
                   "--target_virtual_pipeline_model_parallel_size", "1", "--target_pipeline_layers", "3,3") == 0
    state = torch.load(tmp_path / "plain/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)
    assert "model" in state and "model0" not in state
    assert state["args"].pipeline_model_parallel_size == 2 and state["args"].virtual_pipeline_model_parallel_size is None
    assert convert("--load_path", tmp_path / "plain", "--save_path", tmp_path / "hf2", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf2"), expected)


def test_virtual_pipeline_chunks_must_match_args(tmp_path, capsys):
    model = tiny_gpt2(None, seed=3)
    source = as_virtual_pipeline(reference_megatron_gpt2(model, tmp_path / "four", pp=4), tmp_path / "vpp", pp=2, vpp=2)
    file = source / "release/mp_rank_00_000/model_optim_rng.pt"
    state = torch.load(file, weights_only=False)
    state["args"].virtual_pipeline_model_parallel_size = 3
    torch.save(state, file)
    assert convert("--load_path", source, "--save_path", tmp_path / "hf", "--to", "hf") == 2
    err = capsys.readouterr().err
    assert "holds 2 model chunks but args say virtual_pipeline_model_parallel_size=3" in err and "model_optim_rng.pt" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


# TP2 PP2 in every naming: the family kit (test_family_kit.py)
HF_ROUND_TRIPS = [
    ["--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "1"],
    ["--target_tensor_model_parallel_size", "2"],
    ["--target_pipeline_model_parallel_size", "2"],
    ["--target-tensor-model-parallel-size", "2", "--target-pipeline-layers", "3,1"],
    ["--target_tensor_model_parallel_size", "2", "--megatron_format", "legacy"],
    ["--target_pipeline_layers", "1,2,1", "--megatron_format", "legacy"],
    ["--target_tensor_model_parallel_size", "2", "--transformer_impl", "local"],
]


@pytest.mark.parametrize("flags", HF_ROUND_TRIPS, ids=lambda f: " ".join(f))
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_hf_to_megatron_to_hf(gpt2, gpt2_untied, tmp_path, flags, which):
    hf, _, expected = gpt2 if which == "tied" else gpt2_untied
    assert convert("--load_path", hf, "--save_path", tmp_path / "megatron", "--to", "megatron", *flags) == 0
    assert (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert convert("--load_path", tmp_path / "megatron", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)


def test_reshape_tp2pp2_to_tp1pp1(gpt2, tmp_path):
    hf, model, expected = gpt2
    source = reference_megatron_gpt2(model, tmp_path / "megatron", tp=2, pp=2, schema="transformer_engine")
    assert convert("--load_path", source, "--save_path", tmp_path / "tp1", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "1") == 0
    assert sorted(p.name for p in (tmp_path / "tp1" / "release").iterdir()) == ["conversion.json", "mp_rank_00"]
    assert convert("--load_path", tmp_path / "tp1", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "hf"), expected)


def _load(path):
    return torch.load(path, weights_only=False)


def test_megatron_output_contents_vocab_padding_and_args(gpt2, tmp_path):
    hf, model, _ = gpt2
    assert convert("--load_path", hf, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    first = _load(tmp_path / "m/release/mp_rank_01_000/model_optim_rng.pt")
    last = _load(tmp_path / "m/release/mp_rank_01_001/model_optim_rng.pt")
    args = first["args"]
    assert first["checkpoint_version"] == 3.0
    assert (args.padded_vocab_size, args.vocab_size, args.tensor_model_parallel_size) == (1024, 1000, 2)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.openai_gelu) == (4, 64, 4, True)
    embedding = first["model"]["embedding.word_embeddings.weight"]
    assert embedding.shape == (512, 64)
    wte = model.transformer.wte.weight.detach()
    # rank 1 holds rows 512..1023: true rows 512..999 then copies of the last row
    assert torch.equal(embedding[:488], wte[512:]) and torch.equal(embedding[488:], wte[-1:].expand(24, -1))
    # tied embeddings with PP > 1: the last stage holds a copy of its embedding shard
    assert torch.equal(last["model"]["output_layer.weight"], embedding)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in first["model"]
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in first["model"]


def test_legacy_output_tied_copy_is_word_embeddings_for_head(gpt2, tmp_path):
    hf, model, _ = gpt2
    assert convert("--load_path", hf, "--save_path", tmp_path / "m", "--to", "megatron", "--megatron_format", "legacy",
                   "--target_pipeline_model_parallel_size", "2") == 0
    first = _load(tmp_path / "m/release/mp_rank_00_000/model_optim_rng.pt")["model"]
    last = _load(tmp_path / "m/release/mp_rank_00_001/model_optim_rng.pt")["model"]
    embedding = first["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert torch.equal(last["word_embeddings_for_head"]["weight"], embedding)
    assert "layers.1.self_attention.query_key_value.weight" in last["language_model"]["encoder"]
    assert "final_layernorm.weight" in last["language_model"]["encoder"]


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_dtype(gpt2, tmp_path, dtype, torch_dtype):
    hf, model, _ = gpt2
    assert convert("--load_path", hf, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_params_dtype", dtype) == 0
    args = _load(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt")["args"]
    assert args.params_dtype == torch_dtype and getattr(args, dtype)
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    # bit-exact: the converted model equals the original rounded to the dtype
    rounded = type(model)(model.config)
    rounded.load_state_dict({k: v.to(torch_dtype).float() for k, v in model.state_dict().items()})
    assert_logits_close(logits_of(tmp_path / "hf", dtype=torch.float32), logits_of(rounded), atol=0)
    # and back to Megatron keeps the dtype without further rounding
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m2", "--to", "megatron") == 0
    again = _load(tmp_path / "m2/release/mp_rank_00/model_optim_rng.pt")["model"]
    assert again["embedding.word_embeddings.weight"].dtype == torch_dtype


def test_hf_resharding_and_bin_output(gpt2, tmp_path):
    hf, _, expected = gpt2
    assert convert("--load_path", hf, "--save_path", tmp_path / "sharded", "--to", "hf", "--max_shard_size", "200KB") == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_logits_close(logits_of(tmp_path / "sharded"), expected)
    assert convert("--load_path", tmp_path / "sharded", "--save_path", tmp_path / "bin", "--to", "hf",
                   "--no-safe_serialization", "--max_shard_size", "300KB") == 0
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").is_file()
    assert_logits_close(logits_of(tmp_path / "bin"), expected)
    # a sharded .bin source converts as well
    assert convert("--load_path", tmp_path / "bin", "--save_path", tmp_path / "m", "--to", "megatron") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)


def test_distributed_optimizer_dummy_files(gpt2, tmp_path):
    hf, _, _ = gpt2
    assert convert("--load_path", hf, "--save_path", tmp_path / "m", "--to", "megatron", "--use_distributed_optimizer",
                   "--target_data_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    release = tmp_path / "m" / "release"
    assert (release / "mp_rank_00_001" / "model_rng.pt").is_file()
    for dp in range(2):
        optim = torch.load(release / f"mp_rank_00_001_{dp:03d}" / "optim.pt", weights_only=True)
        assert optim["optimizer"]["step"] == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf") == 0


def test_tokenizer_files_are_copied(gpt2, tmp_path):
    hf, _, _ = gpt2
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    assert convert("--load_path", hf, "--save_path", tmp_path / "m", "--to", "megatron") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf", "--to", "hf",
                   "--tokenizer_name", tokenizer) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"


def _drop_in(*argv):
    import subprocess
    import sys
    from tests.helpers import REPO
    script = REPO / "megatron_gpt2" / "checkpoint_reshaping_and_interoperability.py"
    return subprocess.run([sys.executable, str(script), *map(str, argv), "--quiet"], capture_output=True, text=True)


def test_drop_in_script_both_directions(gpt2, tmp_path):
    hf, _, expected = gpt2
    result = _drop_in("--load_path", hf, "--save_path", tmp_path / "m", "--target_tensor_model_parallel_size", "2",
                      "--target_pipeline_model_parallel_size", "2", "--print-checkpoint-structure")
    assert result.returncode == 0, result.stderr
    assert "format: megatron torch (schema legacy)" in result.stdout  # the output, as inspect_checkpoint.py prints it
    assert "layout: TP 2  PP 2  EP 1  layers per stage: 2,2" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "decoder.layers.0.self_attention.linear_qkv.weight" in line)
    assert "192x64" in row and "mp_rank_00_000,mp_rank_01_000" in row
    rank = _load(tmp_path / "m/release/mp_rank_01_001/model_optim_rng.pt")
    assert "language_model" in rank["model"] and rank["args"].tensor_model_parallel_size == 2
    result = _drop_in("--load_path", tmp_path / "m", "--save_path", tmp_path / "hf",
                      "--convert_checkpoint_from_megatron_to_transformers")
    assert result.returncode == 0, result.stderr
    assert_logits_close(logits_of(tmp_path / "hf"), expected)
