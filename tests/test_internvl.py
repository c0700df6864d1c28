"""InternVL (``InternVLForConditionalGeneration``) in MindSpeed-MM's layout (Ascend/MindSpeed-MM
``checkpoint/vlm_model/converters/internvl.py``): InternViT under ``image_encoder.encoder.``, its projector under
``image_encoder.projector.``, the language model under ``text_decoder.``.

Proof by logits on the family's fixed image+text input (``internvl.family.image_and_text``): the Hugging Face model
after each trip, and megatron-core's GPTModel loaded strictly from the ``text_decoder.*`` tensors at TP2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl.family import INTERNVL, image_and_text
from tests.family_kit import tiny_internvl
from tests.helpers import assert_logits_close, convert
from tests.test_mindspeed_mm import rank_file, to_hf

HEADS, WIDTH = 4, 32  # the tiny vision tower's (tests/family_kit.py)


def internvl_logits(path: Path) -> torch.Tensor:
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**image_and_text(INTERNVL.arch_from_hf_config(model.config))).logits.float()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def internvl(request, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    path = tiny_internvl(tmp_path_factory.mktemp(f"internvl_{request.param}") / "hf", request.param,
                         tie=request.param == "qwen2")
    return path, internvl_logits(path)


def to_mindspeed_mm(source: Path, out: Path, *flags: str) -> Path:
    assert convert("--load_path", source, "--save_path", out, "--to", "megatron", "--megatron_format", "mindspeed_mm",
                   *flags) == 0
    return out


def _vision(state: dict, key: str) -> torch.Tensor:
    return state[f"image_encoder.encoder.encoder.layers.{key}"]


def test_hf_to_mindspeed_mm_tp2_with_split_pipelines_and_back_gives_the_original_logits(tmp_path, internvl):
    source, original = internvl
    mm = to_mindspeed_mm(source, tmp_path / "mm", "--target_tensor_model_parallel_size", "2",
                         "--target_pipeline_layers", "1,3", "--vision_pipeline_layers", "2,0")
    first, last = rank_file(mm, "mp_rank_01_000")["model"], rank_file(mm, "mp_rank_00_001")["model"]
    assert {"image_encoder.encoder.embeddings.class_embedding", "image_encoder.encoder.embeddings.position_embedding",
            "image_encoder.encoder.embeddings.patch_embedding.weight", "image_encoder.projector.norm.bias",
            "image_encoder.projector.linear_fc2.weight", "text_decoder.embedding.word_embeddings.weight",
            "image_encoder.encoder.encoder.layers.1.ls2"} <= set(first)
    assert not any(key.startswith("image_encoder.") for key in last)
    assert {"text_decoder.decoder.layers.2.mlp.linear_fc1.weight", "text_decoder.output_layer.weight"} <= set(last)
    hf = load_file(source / "model.safetensors")  # transformers 5 writes the older spelling
    layer = "vision_tower.encoder.layer.1."
    q, k, v = (hf[f"{layer}attention.{n}_proj.weight"] for n in "qkv")
    rows = WIDTH // 2  # two of the four heads on each rank, as [q; k; v] (MindSpeed-MM's UnalignedRowSplit)
    assert torch.equal(_vision(first, "1.self_attention.linear_qkv.weight"), torch.cat([q[rows:], k[rows:], v[rows:]]))
    assert torch.equal(_vision(first, "1.ls1"), hf[f"{layer}lambda_1"])
    assert torch.equal(first["image_encoder.projector.linear_fc1.weight"], hf["multi_modal_projector.linear_1.weight"])
    back = to_hf(tmp_path, mm, source)
    assert_logits_close(internvl_logits(back), original)
    assert "model.vision_tower.encoder.layer.1.lambda_1" in load_file(back / "model.safetensors")  # the model's names
    again = to_mindspeed_mm(back, tmp_path / "again", "--target_tensor_model_parallel_size", "2",
                            "--target_pipeline_layers", "1,3", "--vision_pipeline_layers", "2,0")
    assert all(torch.equal(tensor, rank_file(again, "mp_rank_01_000")["model"][key]) for key, tensor in first.items())


def test_tp1_to_tp2_reshape_within_the_layout_gives_the_original_logits(tmp_path, internvl):
    source, original = internvl
    tp1 = to_mindspeed_mm(source, tmp_path / "tp1")
    tp2 = tmp_path / "tp2"
    assert convert("--load_path", tp1, "--save_path", tp2, "--to", "megatron", "--hf_config_dir", source,
                   "--target_tensor_model_parallel_size", "2") == 0
    merged = _vision(rank_file(tp1, "mp_rank_00")["model"], "0.self_attention.linear_qkv.weight")
    shards = [_vision(rank_file(tp2, f"mp_rank_0{tp}")["model"], "0.self_attention.linear_qkv.weight") for tp in (0, 1)]
    assert torch.equal(merged, torch.cat([torch.cat([shard.chunk(3)[part] for shard in shards]) for part in range(3)]))
    assert_logits_close(internvl_logits(to_hf(tmp_path, tp2, source)), original)


@pytest.mark.parametrize("damage", ["layer scale dropped", "qkv interleaved per head"])
def test_verify_logits_sees_a_lost_layer_scale_or_a_reordered_qkv(tmp_path, internvl, capsys, damage):
    """verify --logits feeds both models the image and text: a layer scale left at one, or the fused projection in
    megatron-core's per-head order ([q_h, k_h, v_h], MindSpeed-MM's Qwen2.5-VL layout), moves the logits far; the
    undamaged tree gives the original's."""
    from checkpoint_convert.commands.report_cli import run_verify_cli
    source, _ = internvl
    mm = to_mindspeed_mm(source, tmp_path / "mm", "--target_tensor_model_parallel_size", "2")
    capsys.readouterr()
    assert run_verify_cli([str(source), str(mm), "--logits", "--hf_config_dir", str(source)]) == 0
    assert "logits: max |diff| 0" in capsys.readouterr().out
    for tp in (0, 1):
        file = mm / "release" / f"mp_rank_0{tp}" / "model_optim_rng.pt"
        state = torch.load(file, weights_only=True)
        if damage == "layer scale dropped":
            state["model"]["image_encoder.encoder.encoder.layers.0.ls1"].fill_(1.0)
        else:
            qkv = state["model"]["image_encoder.encoder.encoder.layers.0.self_attention.linear_qkv.weight"]
            q, k, v = qkv.chunk(3)
            qkv.copy_(torch.cat([k, q, v]))
        torch.save(state, file)
    assert run_verify_cli([str(source), str(mm), "--logits", "--atol", "10", "--hf_config_dir", str(source)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("logits"))
    assert float(line.split()[-1]) > 1e-4, line


def test_a_vocabulary_tp_does_not_divide_is_split_unevenly_as_mindspeed_mm_does(tmp_path):
    """MindSpeed-MM's InternVL converter splits the word embeddings and output layer with UnalignedEmbeddingSplit:
    127 rows at TP2 are 64 + 63 (InternVL 3's 151674 at TP4: 37919, 37919, 37918, 37918); inspect reads them."""
    from checkpoint_convert.commands.report_cli import run_inspect_cli
    source = tiny_internvl(tmp_path / "hf", vocab=127)
    mm = to_mindspeed_mm(source, tmp_path / "mm", "--target_tensor_model_parallel_size", "2")
    for tp, rows in enumerate((64, 63)):
        model = rank_file(mm, f"mp_rank_0{tp}")["model"]
        assert model["text_decoder.embedding.word_embeddings.weight"].shape[0] == rows
        assert model["text_decoder.output_layer.weight"].shape[0] == rows
    assert run_inspect_cli([str(mm), "--check", "--hf_config_dir", str(source)]) == 0
    assert_logits_close(internvl_logits(to_hf(tmp_path, mm, source)), internvl_logits(source))


def language_model_inputs(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What the Hugging Face model hands its language model on the image+text input (the input embeddings with the
    projected image scattered in), and its logits."""
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    inputs = image_and_text(INTERNVL.arch_from_hf_config(model.config))
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    ids = inputs["input_ids"]
    assert not torch.equal(seen["embeds"], model.model.language_model.embed_tokens(ids)), "the image must show"
    return {"ids": ids, "embeds": seen["embeds"], "positions": torch.arange(ids.shape[1]).expand_as(ids)}, logits


def test_megatron_core_gpt_model_at_tp2_pp2_loads_the_text_decoder(tmp_path, internvl):
    """megatron-core's GPTModel at TP2 x PP2 (language 1,3), each rank loading its own rank file's ``text_decoder.*``
    strictly (tests/megatron_oracle.py ``vl-logits`` with the Hugging Face config), fed Hugging Face's merged input
    embeddings."""
    source, _ = internvl
    inputs, original = language_model_inputs(source)
    mm = to_mindspeed_mm(source, tmp_path / "mm", "--target_tensor_model_parallel_size", "2",
                         "--target_pipeline_layers", "1,3", "--vision_pipeline_layers", "2,0")
    torch.save(inputs, tmp_path / "inputs.pt")
    oracle = Path(__file__).with_name("megatron_oracle.py")
    subprocess.run([sys.executable, str(oracle), "vl-logits", str(mm), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "logits.pt"), "2", "2", str(source)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_logits_close(torch.load(tmp_path / "logits.pt"), original, atol=2e-5)


@pytest.mark.parametrize("vision, flags, message", [
    (dict(num_attention_heads=1), ["--target_tensor_model_parallel_size", "2"],
     "tensor parallel size 2 does not divide the 1 vision attention heads"),
    (dict(use_mean_pooling=False), [], "use_mean_pooling False"),
])
def test_what_mindspeed_mm_cannot_hold_is_refused_in_one_line(tmp_path, capsys, vision, flags, message):
    source = tiny_internvl(tmp_path / "hf", **vision)
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "out", "--to", "megatron", "--megatron_format",
                   "mindspeed_mm", *flags) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "out").exists(), err


def opengvlab_layout(hf: Path, out: Path) -> Path:
    """The model in OpenGVLab's own layout (``internvl_chat``), as its remote code names it and MindSpeed-MM's
    converter reads it: ``vision_model.*`` with q, k and v fused as ``attn.qkv`` [q; k; v], ``mlp1.{0,1,3}``,
    ``language_model.*``; the config's ``llm_config`` and ``intern_vit_6b`` ``vision_config``."""
    config, tensors = json.loads((hf / "config.json").read_text()), load_file(hf / "model.safetensors")
    vision, renamed = config["vision_config"], {}
    for name, tensor in tensors.items():
        if ".attention.k_proj." in name or ".attention.v_proj." in name:
            continue
        if ".attention.q_proj." in name:
            tensor = torch.cat([tensors[name.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")])
        for old, new in OPENGVLAB_NAMES:
            name = name.replace(old, new)
        renamed[name] = tensor
    out.mkdir()
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    llm = {**config["text_config"], "architectures": [f"{config['text_config']['model_type'].title()}ForCausalLM"]}
    (out / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "select_layer": -1, "ps_version": "v2", "template": "internvl2_5", "force_image_size": 16, "llm_config": llm,
        "tie_word_embeddings": False, "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "qkv_bias": vision["attention_bias"],
            "qk_normalization": vision["use_qk_norm"], "initializer_factor": 0.1, "image_size": 16, "patch_size": 4,
            **{key: vision[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "intermediate_size", "norm_type", "layer_norm_eps", "hidden_act")}}}))
    return out


OPENGVLAB_NAMES = (
    ("vision_tower.encoder.layer.", "vision_model.encoder.layers."), ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"), ("attention.q_proj", "attn.qkv"), ("attention.projection_layer", "attn.proj"),
    ("attention.q_norm", "attn.q_norm"), ("attention.k_norm", "attn.k_norm"), ("lambda_1", "ls1"),
    ("lambda_2", "ls2"), ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection", "vision_model.embeddings.patch_embedding"),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("multi_modal_projector.layer_norm", "mlp1.0"), ("multi_modal_projector.linear_1", "mlp1.1"),
    ("multi_modal_projector.linear_2", "mlp1.3"))


@pytest.mark.parametrize("text", ["qwen2", "llama"])
def test_opengvlab_layout_reads_as_transformers_and_as_mindspeed_mm_config(tmp_path, text):
    """OpenGVLab's layout, which MindSpeed-MM's converter starts from: to Hugging Face (transformers' layout) and to
    MindSpeed-MM and back with it as --hf_config_dir give the original's logits; its image token is InternVL 3's
    <IMG_CONTEXT> 151667 (its config names none), so the tiny vocabulary holds it."""
    source = tiny_internvl(tmp_path / "hf", text, tie=True, vocab=151680)  # tied: half the large vocabulary
    original = internvl_logits(source)
    opengvlab = opengvlab_layout(source, tmp_path / "opengvlab")
    direct = tmp_path / "direct"
    assert convert("--load_path", opengvlab, "--save_path", direct, "--to", "hf") == 0
    assert json.loads((direct / "config.json").read_text())["image_token_id"] == 151667
    assert_logits_close(internvl_logits(direct), original)
    mm = to_mindspeed_mm(opengvlab, tmp_path / "mm", "--target_tensor_model_parallel_size", "2")
    assert_logits_close(internvl_logits(to_hf(tmp_path, mm, opengvlab)), original)
