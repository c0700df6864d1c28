"""LLaVA in megatron-core's LLaVA layout: proof by logits on a fixed image+text input (pixels from a seeded generator).

megatron-core's LLaVAModel built on CPU from the args we write (``tests/llava_oracle.py``) loads our rank files
strictly at TP 1 and 2 and gives the Hugging Face model's logits; Hugging Face -> Megatron (TP2 x PP2) -> Hugging Face
gives the original's logits; what megatron-core's LLaVA cannot express is refused in one line.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_logits_close, assert_reports_read, convert
from checkpoint_convert.engine.mcore_vlm import LOADER_LLAVA_DEFAULTS
from tests.llava_helpers import (IMAGE, as_megatron_lms_args, llava_inputs, llava_logits, read_back_with_hf_config,
                                 tiny_llava)

ORACLE = Path(__file__).with_name("llava_oracle.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny LLaVAs with a CLIP tower by language model (Qwen2's with tied embeddings), made once: (path, logits)."""
    made: dict[str, tuple[Path, torch.Tensor]] = {}

    def model(text: str) -> tuple[Path, torch.Tensor]:
        if text not in made:
            path = tiny_llava(tmp_path_factory.mktemp(text) / "hf", text=text, tie=text == "qwen2")
            made[text] = path, llava_logits(path)
        return made[text]
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def clip(request, models) -> tuple[Path, torch.Tensor]:
    return models(request.param)


def megatron_logits(ckpt: Path, tp: int, pp: int, work: Path) -> torch.Tensor:
    """megatron-core's logits: its input holds one image token, which LLaVAModel expands into the image's features."""
    given = llava_inputs()
    ids = given["input_ids"][0].tolist()
    first = ids.index(IMAGE)
    torch.save({"ids": torch.tensor([ids[:first + 1] + [t for t in ids[first:] if t != IMAGE]]),
                "pixels": given["pixel_values"]}, work / "inputs.pt")
    result = subprocess.run([sys.executable, str(ORACLE), str(ckpt), str(work / "inputs.pt"), str(work / "out.pt"),
                             str(tp), str(pp)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "out.pt")


@pytest.mark.parametrize("text, tp, pp", [("llama", 1, 1), ("llama", 2, 1), ("llama", 1, 2), ("qwen2", 2, 2)])
def test_megatron_core_llava_loads_our_rank_files_and_gives_the_logits(tmp_path, models, text, tp, pp):
    source, original = models(text)
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron", "--transformer_impl",
                   "local", "--target_tensor_model_parallel_size", str(tp), "--target_pipeline_model_parallel_size",
                   str(pp)) == 0
    first = "mp_rank_00" + ("_000" if pp > 1 else "")
    args = torch.load(tmp_path / "m" / "release" / first / "model_optim_rng.pt", weights_only=False)["args"]
    assert (args.vision_model_type, args.img_h, args.patch_dim, args.disable_vision_class_token) == ("clip", 28, 7, True)
    # what Megatron-LM's loader_llava and examples/multimodal/model.py read from the checkpoint's args (checked by hand
    # against tag core_v0.17.1: its model provider builds LLaVAModel from them and loads our rank files strictly)
    assert LOADER_LLAVA_DEFAULTS.keys() <= vars(args).keys()
    assert (args.decoder_seq_length, args.use_te, args.num_frames, args.language_model_type) == (
        args.seq_length, False, 1, f"hf_{text}")
    logits = megatron_logits(tmp_path / "m", tp, pp, tmp_path)
    print(f"max logit difference at TP{tp} PP{pp}: {(logits - original).abs().max().item():.2e}")
    assert_logits_close(logits, original, atol=2e-5)


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_torch_dist_loads_strictly_into_megatron_core_llava_and_converts_back(tmp_path, models, text):
    """megatron-core's ``dist_checkpointing.load`` (strict: every key asked for, none left over): the vision layers
    stacked as its blocks stack them, the projector and language model under their prefixes."""
    source, original = models(text)
    assert convert("--load_path", source, "--save_path", tmp_path / "d", "--to", "megatron", "--megatron_ckpt_format",
                   "torch_dist", "--transformer_impl", "local", "--target_tensor_model_parallel_size", "2") == 0
    logits = megatron_logits(tmp_path / "d", 2, 1, tmp_path)
    print(f"max logit difference, torch_dist at TP2: {(logits - original).abs().max().item():.2e}")
    assert_logits_close(logits, original, atol=2e-5)
    assert convert("--load_path", source, "--save_path", tmp_path / "te", "--to", "megatron", "--megatron_ckpt_format",
                   "torch_dist") == 0
    assert convert("--load_path", tmp_path / "te", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(llava_logits(tmp_path / "back"), original)


def test_round_trip_through_tp2_pp2_gives_the_original_logits(tmp_path, clip):
    source, original = clip
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2") == 0
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "tp1", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "1") == 0
    assert convert("--load_path", tmp_path / "tp1", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(llava_logits(tmp_path / "back"), original)


def test_siglip_converts_between_hugging_face_directories_and_is_refused_for_megatron(tmp_path, capsys):
    source = tiny_llava(tmp_path / "hf", vision="siglip_vision_model", feature_layer=-1, strategy="full")
    original = llava_logits(source, "full", "siglip_vision_model")
    assert convert("--load_path", source, "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(llava_logits(tmp_path / "back", "full", "siglip_vision_model"), original)
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron") != 0
    err = capsys.readouterr().err
    assert "ln_post" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_inspect_verify_and_dry_run_read_the_rank_files(tmp_path, models, capsys):
    """verify --logits feeds the family's image and text: a vision tower that differs changes the logits it reports."""
    from safetensors.torch import load_file, save_file

    from checkpoint_convert.commands.report_cli import run_verify_cli
    source, _ = models("llama")
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2") == 0
    assert_reports_read(source, tmp_path / "m", "llava", capsys)
    changed = shutil.copytree(source, tmp_path / "changed")  # the first vision layer's queries scaled
    weights = load_file(changed / "model.safetensors")
    weights["vision_tower.encoder.layers.0.self_attn.q_proj.weight"] *= 1.5
    save_file(weights, changed / "model.safetensors")
    capsys.readouterr()
    assert run_verify_cli([str(changed), str(tmp_path / "m"), "--logits", "--atol", "10"]) == 0
    logits_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("logits")][0]
    assert float(logits_line.split()[-1]) > 1e-4, logits_line


def test_rank_files_with_megatron_lms_own_args_read_with_the_hugging_face_config(tmp_path, capsys):
    """Megatron-LM's training and ``saver_llava`` write args naming ``vision_model_type`` and no Hugging Face config
    (nor the image token's id): read with ``--hf_config_dir``, as Megatron-LM's LLaVA runs every vision layer."""
    source = tiny_llava(tmp_path / "hf", feature_layer=-1)
    original = llava_logits(source)
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "2") == 0
    as_megatron_lms_args(tmp_path / "m")
    read_back_with_hf_config(tmp_path / "m", tmp_path / "back", source, capsys)
    assert_logits_close(llava_logits(tmp_path / "back"), original)
    siglip = tiny_llava(tmp_path / "siglip", vision="siglip_vision_model", feature_layer=-1, strategy="full")
    capsys.readouterr()  # a SigLIP LLaVA trained by Megatron-LM applies ln_post, which transformers' never does
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "no", "--to", "hf",
                   "--hf_config_dir", siglip) != 0
    assert "ln_post" in capsys.readouterr().err


def test_megatron_lms_language_model_name_only_where_its_projector_is_transformers():
    """Megatron-LM's examples/multimodal fixes a language model's MLP and projector by name: "mistral_7b" (projector
    14336 wide, no norm) holds a transformers LLaVA at hidden size 14336 only; anything else keeps an hf_ name."""
    import transformers
    from llava.megatron_core import LLAVA_MCORE as LLAVA, language_model_type

    def arch(text: str, hidden: int, ffn: int):
        config = transformers.LlavaConfig(text_config=dict(model_type=text, hidden_size=hidden, intermediate_size=ffn,
                                                           num_attention_heads=8, num_key_value_heads=8))
        return LLAVA.arch_from_hf_config(config)
    assert language_model_type(arch("mistral", 14336, 14336)) == "mistral_7b"
    assert language_model_type(arch("mistral", 4096, 14336)) == "hf_mistral"  # Mistral-7B: projector 4096 wide
    assert language_model_type(arch("qwen2", 3584, 18944)) == "hf_qwen2"  # Megatron-LM's qwen2.5_7B normalises


def test_a_list_of_feature_layers_is_refused_in_one_line(tmp_path, capsys):
    source = tiny_llava(tmp_path / "hf", feature_layer=[-2, -1])
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron") != 0
    err = capsys.readouterr().err
    assert "vision_feature_layer [-2, -1]" in err and len(err.strip().splitlines()) == 1, err


def test_a_tensor_parallel_size_that_does_not_divide_the_vision_heads_is_refused(tmp_path, capsys):
    source = tiny_llava(tmp_path / "hf", vision_sizes={"num_attention_heads": 2},
                        text_sizes={"num_key_value_heads": 4})
    capsys.readouterr()
    assert convert("--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_tensor_model_parallel_size", "4") != 0
    err = capsys.readouterr().err
    assert "does not divide the 2 vision attention heads" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_torchrun_splits_the_conversion_across_processes(tmp_path, models):
    from tests.test_torchrun import torchrun
    source, original = models("llama")
    result = torchrun(2, "--load_path", source, "--save_path", tmp_path / "m", "--to", "megatron",
                      "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(llava_logits(tmp_path / "back"), original)
