"""Nemotron-H beyond the family kit: the megatron-core oracle's torch bodies against transformers' torch path,
tensor parallelism of the Mamba mixer against Megatron-LM's ``tools/checkpoint/hybrid_conversion.py`` rules,
published checkpoints' names, Megatron-LM 0.18's pattern spelling and the layouts megatron-core cannot build.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_convert.base.errors import BadInputError
from checkpoint_convert.formats.hybrid import hybrid_fields
from tests.family_kit import NEMOTRON_H_MOE, nemotron_h
from tests.helpers import assert_logits_close, convert, logits_of
from tests.mamba_oracle import GatedRMSNorm, rearrange, ssd_reference

MAMBA = dict(d_inner=64, groups=2, state=16, heads=8)  # the kit's sizes (tests/family_kit.py NEMOTRON_H)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny Nemotron-H with every layer kind, saved as transformers 5 writes it, and its logits."""
    path = tmp_path_factory.mktemp("nemotron_h") / "hf"
    built = nemotron_h(21, "M*-E", random_buffers=("e_score_correction_bias",), **NEMOTRON_H_MOE)(path)
    return path, logits_of(built)


def test_oracle_scan_and_gated_norm_are_transformers_torch_path():
    """The oracle's stand-ins for mamba_ssm's kernels compute what transformers' torch path computes: the step by
    step recurrence what its chunked scan gives (chunks of 4 over 11 steps), the gated group norm its
    NemotronHRMSNormGated; ``rearrange`` what einops would."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNormGated, mamba2_chunk_scan

    generator = torch.Generator().manual_seed(0)
    def rand(*shape):
        return torch.randn(*shape, generator=generator)
    x, dt, B, C = rand(2, 11, 8, 8), rand(2, 11, 8), rand(2, 11, 2, 16), rand(2, 11, 2, 16)
    A, D, dt_bias = -torch.rand(8, generator=generator) - 0.5, rand(8), rand(8)
    ours = ssd_reference(x, dt, A, B, C, 4, D=D, dt_bias=dt_bias, dt_softplus=True)
    theirs = mamba2_chunk_scan(x, dt, A, B, C, 4, D=D, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - ssd_reference(x, dt, A, B, C, 4, D=D, dt_bias=dt_bias)).abs().max() > 1e-2  # softplus matters

    y, z, weight = rand(2, 11, 64), rand(2, 11, 64), rand(64)
    norm, reference = GatedRMSNorm(64, eps=1e-5, group_size=32), NemotronHRMSNormGated(64, group_size=32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        reference.weight.copy_(weight)
    torch.testing.assert_close(norm(y, z), reference(y, z))
    assert torch.equal(rearrange(x, "b l h p -> l b (h p)"), x.permute(1, 0, 2, 3).reshape(11, 2, 64))
    assert torch.equal(rearrange(x.reshape(2, 11, 64), "b l (h p) -> b l h p", p=8), x)


# Megatron-LM tools/checkpoint/hybrid_conversion.py (main, 2026): the dimension each tensor splits along across
# tensor-parallel ranks (-1: copied to every rank), found by name fragment; in_proj's [z, x, B, C, dt] (it names the
# first two x, z: the same sizes) and conv1d's [x, B, C] split part by part, B and C by whole groups of state rows.
HYBRID_CONVERSION_DIMS = (("mixer.norm.weight", 0), ("norm.weight", -1), ("word_embeddings.weight", 0),
                          ("output_layer.weight", 0), ("A_log", 0), ("dt_bias", 0), ("in_proj.weight", 0),
                          ("conv1d.weight", 0), ("conv1d.bias", 0), ("out_proj.weight", 1), (".D", 0),
                          ("linear_fc1.weight", 0), ("linear_fc2.weight", 1), ("linear_proj.weight", 1),
                          ("linear_qkv.weight", 0))


def _split_dim(key: str) -> int:
    return next(dim for fragment, dim in HYBRID_CONVERSION_DIMS if fragment in key)


def _hybrid_conversion_split(key: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """One tensor's shards as hybrid_conversion.py's ``split_tensor_for_tp`` makes them (re-expressed)."""
    dim = _split_dim(key)
    if dim == -1:
        return [tensor] * tp
    d_inner, groups, state, heads = MAMBA["d_inner"], MAMBA["groups"], MAMBA["state"], MAMBA["heads"]
    if "mixer.in_proj.weight" in key:
        sizes = [d_inner, d_inner, groups * state, groups * state, heads]
    elif "mixer.conv1d" in key:
        sizes = [d_inner, groups * state, groups * state]
    else:
        return list(torch.chunk(tensor, tp, dim=dim))
    parts = list(torch.split(tensor, sizes, dim=0))
    chunks = []
    for index, part in enumerate(parts):
        if sizes[index] == groups * state:  # by whole groups: [groups, state, ...] chunked on the group axis
            grouped = part.reshape(groups, state, *part.shape[1:])
            chunks.append([piece.flatten(0, 1) for piece in torch.chunk(grouped, tp, dim=0)])
        else:
            chunks.append(list(torch.chunk(part, tp, dim=0)))
    return [torch.cat([part[rank] for part in chunks], dim=0) for rank in range(tp)]


def _rank_model(tree: Path, rank: str) -> dict[str, torch.Tensor]:
    state = torch.load(tree / "release" / rank / "model_optim_rng.pt", weights_only=False)["model"]
    return {key: value for key, value in state.items() if not key.endswith("_extra_state")}


def test_mamba_tensor_parallelism_is_megatron_lm_hybrid_conversion(model, tmp_path):
    """Our TP1 -> TP2 reshape writes, tensor by tensor, what hybrid_conversion.py's split rules make of our TP1 rank
    file (local naming: that tool does not know Transformer Engine's fused in_proj norm); and back at TP1 the model
    computes the original's logits (megatron-core's own logits at TP2 are the family kit's)."""
    path, expected = model
    assert convert("--load_path", path, "--save_path", tmp_path / "tp1", "--to", "megatron",
                   "--transformer_impl", "local") == 0
    assert convert("--load_path", tmp_path / "tp1", "--save_path", tmp_path / "tp2", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2") == 0
    full = _rank_model(tmp_path / "tp1", "mp_rank_00")
    shards = [_rank_model(tmp_path / "tp2", f"mp_rank_{rank:02d}") for rank in range(2)]
    mixer = [key for key in full if ".mixer." in key]
    assert len(mixer) == 8 and all(set(shard) == set(full) for shard in shards)
    for key, tensor in full.items():
        if ".mlp.router." in key or "pre_mlp_layernorm" in key:  # expert layers: not hybrid_conversion.py's
            assert all(torch.equal(shard[key], tensor) for shard in shards), key
            continue
        if "word_embeddings" in key or "output_layer" in key:  # vocab padded for TP2 (1000 -> 1024 rows)
            tensor = torch.cat([tensor, tensor[-1:].expand(1024 - tensor.shape[0], -1)])
        expected_shards = _hybrid_conversion_split(key, tensor, 2)
        for rank in range(2):
            assert torch.equal(shards[rank][key], expected_shards[rank]), (key, rank)
    assert convert("--load_path", tmp_path / "tp2", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)


def test_a_published_checkpoints_names_are_read(model, tmp_path):
    """Published Nemotron-H checkpoints name the model ``backbone`` and store experts one by one, and their
    config.json says ``hybrid_override_pattern``: converted to Megatron and back, the original's logits."""
    path, expected = model
    tensors = load_file(path / "model.safetensors")
    published = {}
    for name, tensor in tensors.items():
        name = name.replace("model.", "backbone.", 1)
        if name.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
            for expert, weight in enumerate(tensor):
                published[name.replace("experts.", f"experts.{expert}.") + ".weight"] = weight.clone()
        else:
            published[name] = tensor
    source = tmp_path / "published"
    source.mkdir()
    save_file(published, source / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["hybrid_override_pattern"] = "".join({"linear_attention": "M", "full_attention": "*", "mlp": "-",
                                                 "moe": "E"}[kind] for kind in config.pop("layers_block_type"))
    (source / "config.json").write_text(json.dumps(config))
    assert convert("--load_path", source, "--save_path", tmp_path / "megatron", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "megatron", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)


def test_megatron_lm_018_pattern_spelling():
    """Megatron-LM 0.18's ``hybrid_layer_pattern`` marks pipeline stages with ``|`` (and multi-token prediction
    layers after ``/``, which are not converted); 0.16's ``hybrid_override_pattern``; ratios alone are refused."""
    def args(**fields):
        return argparse.Namespace(mamba_state_dim=16, mamba_head_dim=8, mamba_num_groups=2, **fields)
    assert hybrid_fields(args(hybrid_layer_pattern="M*|-E"), 4, 64, "args")["layer_pattern"] == "M*-E"
    fields = hybrid_fields(args(hybrid_override_pattern="M*-E", mamba_num_heads=None), 4, 64, "args")
    assert fields["layer_pattern"] == "M*-E" and fields["mamba"].num_heads == 16  # hidden x 2 / head dim
    assert hybrid_fields(args(), 4, 64, "args") == {}
    for bad in (dict(hybrid_layer_pattern="M*-E/*E"), dict(hybrid_override_pattern="M*-"),
                dict(hybrid_override_pattern="M*-X"), dict(is_hybrid_model=True, hybrid_attention_ratio=0.25)):
        with pytest.raises(BadInputError):
            hybrid_fields(args(**bad), 4, 64, "args")


def test_inspect_shows_the_layer_pattern_by_stage(model, tmp_path, capsys):
    from checkpoint_convert.commands.report_cli import run_inspect_cli

    assert convert("--load_path", model[0], "--save_path", tmp_path / "pp2", "--to", "megatron",
                   "--target_pipeline_layers", "3,1") == 0
    capsys.readouterr()
    assert run_inspect_cli([str(tmp_path / "pp2")]) == 0
    assert "layers: M*-|E (M Mamba-2, * attention, - MLP, E experts" in capsys.readouterr().out
    args = torch.load(tmp_path / "pp2" / "release" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)["args"]
    assert args.hybrid_override_pattern == "M*-E" and args.is_hybrid_model and args.mamba_num_heads == 8
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) == (3, 1)


@pytest.mark.parametrize("flags, message", [
    (["--target_pipeline_model_parallel_size", "2", "--target_virtual_pipeline_model_parallel_size", "2"],
     "no virtual pipeline"),
    (["--target_tensor_model_parallel_size", "4"], "does not divide the 2 query groups"),
    (["--target_pipeline_layers", "0,4"], "none empty"),
])
def test_layouts_megatron_core_cannot_build_are_refused(model, tmp_path, capsys, flags, message):
    path, _ = model
    assert convert("--load_path", path, "--save_path", tmp_path / "out", "--to", "megatron", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "out").exists()


def test_latent_expert_projections(tmp_path):
    """Experts working in a latent space (``moe_latent_size``: ``mixer.fc1_latent_proj`` / ``fc2_latent_proj`` <->
    megatron-core's ``mlp.fc1_latent_proj`` / ``fc2_latent_proj``, duplicated on every TP rank). megatron-core builds
    them only with Transformer Engine, so a Hugging Face round trip through TP2 PP2 proves them."""
    expected = logits_of(nemotron_h(22, "ME*E", moe_latent_size=32, **NEMOTRON_H_MOE)(tmp_path / "hf"))
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "megatron", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    state = torch.load(tmp_path / "megatron" / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert state["args"].moe_latent_size == 32 and state["model"]["decoder.layers.1.mlp.fc1_latent_proj.weight"].shape == (32, 64)
    assert state["model"]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"].shape == (8, 32)
    assert convert("--load_path", tmp_path / "megatron", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), expected)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["moe_latent_size"] == 32


def test_a_config_whose_mamba_sizes_do_not_fit_the_tensors_is_refused(model, tmp_path, capsys):
    path, _ = model
    source = tmp_path / "wrong"
    source.mkdir()
    (source / "model.safetensors").symlink_to(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "ssm_state_size": 8}))
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "megatron") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and "mixer.in_proj.weight" in err, err
