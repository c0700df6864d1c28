"""inspect describes every format truthfully and --check finds damage; verify proves sameness and catches
the bugs a converter makes (a perturbed weight, two swapped query heads)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, convert, reference_megatron_gpt2, tiny_gpt2
from tests.test_llama import tiny_llama
from tests.test_mixtral import tiny_mixtral
from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli


def inspect_json(path, capsys, *flags):
    code = run_inspect_cli([str(path), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def _rank_file(root, name):
    return root / "release" / name / "model_optim_rng.pt"


def _rewrite(file, change):
    state = torch.load(file, weights_only=False)
    change(state["model"])
    torch.save(state, file)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2(root / "hf")
    for schema in ("legacy", "local", "transformer_engine"):
        reference_megatron_gpt2(model, root / schema, tp=2, pp=2, schema=schema)
    assert convert("--load_path", root / "hf", "--save_path", root / "dist", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist", "--target_tensor_model_parallel_size", "2") == 0
    return root, model


@pytest.mark.parametrize("kind,fmt,schema", [
    ("legacy", "megatron torch", "legacy"), ("local", "megatron torch", "local"),
    ("transformer_engine", "megatron torch", "transformer_engine"),
    ("dist", "megatron torch_dist", "transformer_engine"), ("hf", "huggingface safetensors", None)])
def test_inspect_describes_every_format(gpt2, capsys, kind, fmt, schema):
    root, model = gpt2
    code, report = inspect_json(root / kind, capsys)
    assert code == 0
    assert (report["format"], report["schema"], report["family"]) == (fmt, schema, "gpt2")
    assert report["parameters"] == model.num_parameters()  # the tied output layer counted once
    assert report["vocab"] == {"true": 1000, "padded": 1000 if kind == "hf" else 1024}
    assert report["architecture"]["num_layers"] == 4 and report["architecture"]["hidden_size"] == 64
    rows = {row["name"]: row for row in report["tensors"]}
    if kind == "hf":
        assert rows["transformer.h.3.attn.c_attn.weight"]["shape"] == [64, 192]
        return
    qkv = rows["decoder.layers.3.self_attention.linear_qkv.weight"]
    assert qkv["shape"] == [192, 64] and qkv["dtype"] == "float32"
    if kind == "dist":
        assert report["layout"]["tp"] == 2 and qkv["held_by"] == ["__0_0.distcp"]
    else:
        assert report["layout"] == {"tp": 2, "pp": 2, "ep": 1, "vpp": 1, "layers_per_stage": [2, 2]}
        assert qkv["held_by"] == ["mp_rank_00_001", "mp_rank_01_001"]  # layer 3 lives on the second stage
        assert rows["embedding.word_embeddings.weight"]["held_by"] == ["mp_rank_00_000", "mp_rank_01_000"]


def test_inspect_text_and_expert_layout(tmp_path, capsys):
    tiny_mixtral(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_expert_model_parallel_size", "2") == 0
    assert run_inspect_cli([str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "family: mixtral" in text and "layout: TP 1  PP 1  EP 2" in text
    assert "num_experts=4 moe_router_topk=2" in text
    row = next(line for line in text.splitlines() if "decoder.layers.0.mlp.experts.local_experts.*.linear_fc1" in line)
    assert "4x192x64" in row and "mp_rank_00_000,mp_rank_00_001" in row


def test_inspect_text_of_a_dense_model_has_no_expert_fields(gpt2, capsys):
    root, _ = gpt2
    assert run_inspect_cli([str(root / "local")]) == 0
    text = capsys.readouterr().out
    assert "family: gpt2" in text and "num_layers=4 hidden_size=64" in text and "moe_" not in text


def test_check_passes_a_sound_checkpoint_and_finds_a_corrupted_replica(gpt2, tmp_path, capsys):
    root, _ = gpt2
    assert inspect_json(root / "local", capsys, "--check") == (0, inspect_json(root / "local", capsys)[1] | {"problems": []})
    import shutil
    shutil.copytree(root / "local", tmp_path / "bad")

    def corrupt(model):
        model["decoder.layers.1.input_layernorm.weight"][5] += 1.0
    _rewrite(_rank_file(tmp_path / "bad", "mp_rank_01_000"), corrupt)
    code, report = inspect_json(tmp_path / "bad", capsys, "--check")
    assert code == 3
    assert report["problems"] == ["decoder.layers.1.input_layernorm.weight: replicated tensor differs between "
                                  "TP ranks 0 and 1 (max |diff| 1)"]


def test_check_finds_nan_and_a_missing_rank(gpt2, tmp_path, capsys):
    import shutil
    root, _ = gpt2
    shutil.copytree(root / "local", tmp_path / "nan")

    def poison(model):
        model["decoder.layers.0.mlp.linear_fc2.weight"][0, 0] = float("nan")
    _rewrite(_rank_file(tmp_path / "nan", "mp_rank_01_000"), poison)
    assert run_inspect_cli([str(tmp_path / "nan"), "--check"]) == 3
    assert "problem: decoder.layers.0.mlp.linear_fc2.weight: contains NaN or Inf values" in capsys.readouterr().out
    shutil.copytree(root / "local", tmp_path / "missing")
    shutil.rmtree(tmp_path / "missing" / "release" / "mp_rank_01_001")
    assert run_inspect_cli([str(tmp_path / "missing"), "--check"]) == 2
    assert "missing rank files for mp_rank_01_001" in capsys.readouterr().err


@pytest.mark.parametrize("a,b", [("hf", "local"), ("hf", "dist"), ("hf", "legacy"), ("legacy", "transformer_engine")])
def test_verify_passes_on_converted_pairs(gpt2, capsys, a, b):
    root, _ = gpt2
    assert run_verify_cli([str(root / a), str(root / b), "--logits"]) == 0
    out = capsys.readouterr().out
    assert "compared 52 tensors: max |diff| 0" in out and "logits: max |diff| 0" in out and out.endswith("EQUAL\n")


def test_verify_makes_each_entry_once_on_each_side(tmp_path, capsys, monkeypatch):
    """Both sides walk one family table: B's tensors pair up with A's as they come, an entry of several
    tensors (q, k, v; gate, up) is made once and none waits for its partner (memory holds one entry of each side)."""
    from checkpoint_convert.run import verification
    tiny_llama(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2") == 0
    made, real = [], verification.item_tensors
    monkeypatch.setattr(verification, "item_tensors",
                        lambda source, item: (made.append((source.kind, item)), real(source, item))[1])
    assert run_verify_cli([str(tmp_path / "hf"), str(tmp_path / "m")]) == 0
    entries = {item for _, item in made}
    assert sorted(kind for kind, _ in made) == ["hf"] * len(entries) + ["megatron"] * len(entries)
    assert f"compared {len(entries) + 4 * 3} tensors" in capsys.readouterr().out  # 4 layers: 3 + 2 from 2 entries


def test_verify_finds_a_change_in_the_last_block_of_merged_tensors(gpt2, tmp_path, capsys, monkeypatch):
    """Blocks of 64 elements: the last element of the merged embedding (TP rank 1's last true vocab row) and
    of a later layer, where merges reuse the memory of earlier ones."""
    import shutil
    from checkpoint_convert.engine import blockwise
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(blockwise, "PIECE_ELEMENTS", 16)
    root, _ = gpt2
    shutil.copytree(root / "legacy", tmp_path / "m")

    def perturb_embedding(model):
        model["language_model"]["embedding"]["word_embeddings"]["weight"][999 - 512, -1] += 0.25  # vocab 1000 of 1024

    def perturb_layer(model):
        model["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.weight"][-1, -1] -= 0.5  # global layer 3
    _rewrite(_rank_file(tmp_path / "m", "mp_rank_01_000"), perturb_embedding)
    _rewrite(_rank_file(tmp_path / "m", "mp_rank_01_001"), perturb_layer)
    assert run_verify_cli([str(root / "local"), str(tmp_path / "m")]) == 3
    differing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("differs")]
    assert differing == ["differs: transformer.wte.weight (max |diff| 0.25)",
                         "differs: transformer.h.3.mlp.c_proj.weight (max |diff| 0.5)"]


def test_verify_compares_another_dtype_by_value(gpt2, tmp_path, capsys):
    root, _ = gpt2
    assert convert("--load_path", root / "hf", "--save_path", tmp_path / "bf16", "--to", "megatron",
                   "--target_params_dtype", "bf16") == 0
    assert run_verify_cli([str(root / "hf"), str(tmp_path / "bf16")]) == 3
    worst = float(capsys.readouterr().out.split("max |diff| ")[-1].split()[0])
    assert 0 < worst < 1e-2
    assert run_verify_cli([str(root / "hf"), str(tmp_path / "bf16"), "--atol", "1e-2"]) == 0


def test_verify_fails_on_a_perturbed_weight(gpt2, tmp_path, capsys):
    import shutil
    root, _ = gpt2
    shutil.copytree(root / "transformer_engine", tmp_path / "m")

    def perturb(model):
        model["decoder.layers.0.mlp.linear_fc1.weight"][3, 7] += 1e-3  # stage 1 starts at global layer 2
    _rewrite(_rank_file(tmp_path / "m", "mp_rank_00_001"), perturb)
    assert run_verify_cli([str(root / "hf"), str(tmp_path / "m")]) == 3
    out = capsys.readouterr().out
    assert "differs: transformer.h.2.mlp.c_fc.weight (max |diff| 0.001)" in out and out.endswith("DIFFERENT\n")
    assert run_verify_cli([str(root / "hf"), str(tmp_path / "m"), "--atol", "2e-3"]) == 0


def test_verify_fails_on_two_swapped_query_heads(tmp_path, capsys):
    """A classic converter bug: two query heads of one group exchanged in Megatron's fused QKV."""
    tiny_llama(tmp_path / "hf")
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron") == 0

    def swap_heads(model):
        qkv = model["decoder.layers.1.self_attention.linear_qkv.weight"]  # per group: [q0, q1, k, v] x 24 rows
        qkv[0:24], qkv[24:48] = qkv[24:48].clone(), qkv[0:24].clone()
    _rewrite(_rank_file(tmp_path / "m", "mp_rank_00"), swap_heads)
    assert run_verify_cli([str(tmp_path / "hf"), str(tmp_path / "m"), "--logits", "--atol", "1e-5"]) == 3
    out = capsys.readouterr().out
    assert "differs: model.layers.1.self_attn.q_proj.weight" in out
    assert "differs: model.layers.1.self_attn.k_proj.weight" not in out
    logits = float(out.split("logits: max |diff| ")[1].split()[0])
    assert logits > 1e-3, out


def test_verify_reports_missing_tensors_between_families(gpt2, tmp_path, capsys):
    tiny_llama(tmp_path / "llama")
    root, _ = gpt2
    assert run_verify_cli([str(root / "hf"), str(tmp_path / "llama")]) == 3
    out = capsys.readouterr().out
    assert "only in A: transformer.wte.weight" in out and "only in B: model.embed_tokens.weight" in out


def test_verify_reads_a_config_as_its_config_class_does(tmp_path, capsys, monkeypatch):
    """A transformers 4 config (legacy ``rope_scaling``): read as written it has no scaling. verify begins
    on that reading while the config class is imported, then starts over with the class's reading, which
    the logits against the conversion (whose args carry the scaling) prove."""
    from checkpoint_convert.commands import report_cli
    tiny_llama(tmp_path / "hf", seed=4)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron") == 0
    opened, real = [], report_cli.open_checkpoint
    monkeypatch.setattr(report_cli, "open_checkpoint", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    assert run_verify_cli([str(tmp_path / "hf"), str(tmp_path / "m"), "--logits", "--atol", "1e-5"]) == 0, \
        capsys.readouterr().out
    assert len(opened) == 4  # both sides on the early reading, then again


def test_drop_in_script_prints_the_converted_structure(gpt2, tmp_path):
    root, _ = gpt2
    result = subprocess.run([sys.executable, str(REPO / "megatron_gpt2" / "checkpoint_reshaping_and_interoperability.py"),
                             "--load_path", str(root / "legacy"), "--save_path", str(tmp_path / "out"),
                             "--convert_checkpoint_from_megatron_to_transformers", "--print-checkpoint-structure",
                             "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "format: huggingface safetensors" in result.stdout
    assert "transformer.h.3.attn.c_attn.weight" in result.stdout
