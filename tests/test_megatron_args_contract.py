"""Megatron-LM's own loaders must read every Megatron checkpoint we write: the fields of ``args`` they need.

The lists below were written by reading NVIDIA/Megatron-LM at tag core_v0.17.1 (the last with the legacy
model and ``tools/checkpoint/loader_legacy.py``) and at HEAD (d98e8a64dd, 2026-08); they are the contract,
and every expected value here comes from the Hugging Face config and the flags of the conversion, never
from our writer. ``pretrain_gpt.py --load DIR --use-checkpoint-args`` and ``tools/checkpoint/convert.py
--loader core|legacy`` both run ``load_args_from_checkpoint`` and ``load_checkpoint``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from checkpoint_convert.formats.megatron_args import tokenizer_fields
from checkpoint_convert.formats.torch_dist import read_metadata
from tests.helpers import convert, reference_megatron_gpt2, tiny_gpt2
from tests.test_llama import MEGATRON_LM_TREE, tiny_llama
from tests.test_mixtral import tiny_mixtral

# megatron/training/checkpointing.py ``load_args_from_checkpoint``: every field it copies from the
# checkpoint's args with ``_set_arg`` (both versions; HEAD adds moe_single_grouped_weight/_bias, and fills
# gdp_num_householder itself when absent). Absent or None, the run keeps its command-line default, which
# need not describe the checkpoint: every one must be present.
COPIED_BY_LOAD_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
    "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization", "apply_query_key_layer_scaling",
    "attention_dropout", "hidden_dropout", "mtp_num_layers", "spec", "num_experts", "moe_layer_freq",
    "moe_ffn_hidden_size", "moe_router_topk", "moe_token_dispatcher_type", "moe_router_pre_softmax",
    "moe_grouped_gemm", "moe_shared_expert_intermediate_size", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor", "moe_single_grouped_weight",
    "moe_single_grouped_bias", "tokenizer_model", "tokenizer_type", "padded_vocab_size", "ckpt_format",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "expert_model_parallel_size",
    # its one-off conversion: add_bias_linear = not disable_bias_linear when the checkpoint has it
    "disable_bias_linear",
)
# Those whose None means "feature not used" for a GPT model (a dense model's MoE fields, no virtual pipeline,
# no tokenizer files, ...); every other field must hold a value.
NONE_MEANS_UNUSED = {
    "mtp_num_layers", "spec", "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_router_topk_scaling_factor", "tokenizer_model", "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage",
}
# tools/checkpoint/loader_base.py ``MegatronCheckpointLoaderBase.ensure_required_arguments`` and the same
# list in loader_legacy.py ``_load_checkpoint``: ``check_for_arg`` without a default exits with "Checkpoint
# does not specify argument X" (``iteration`` is the state dict's own key, checked apart).
LOADER_REQUIRED = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size", "seq_length",
    "num_attention_heads", "max_position_embeddings", "position_embedding_type", "tokenizer_type",
    "bert_binary_head", "params_dtype", "disable_bias_linear", "swiglu",
)
# Read as plain attributes (AttributeError when absent): loader_base.parse_megatron_args and loader_legacy
# (``checkpoint_args.fp16``/``.bf16``), saver_base.parse_megatron_args (``.sequence_parallel``,
# ``.apply_query_key_layer_scaling``), checkpointing.check_checkpoint_args (``_compare`` without a default,
# for every rank in load_checkpoint; data_parallel_random_init when the run sets it).
READ_AS_ATTRIBUTES = (
    "fp16", "bf16", "sequence_parallel", "apply_query_key_layer_scaling", "num_layers", "hidden_size",
    "num_attention_heads", "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size",
    "tokenizer_type", "tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_random_init",
)
# megatron/training/arguments.py ``_add_tokenizer_args`` (core_v0.17.1) / TokenizerConfig (HEAD): --tokenizer-type
TOKENIZER_TYPES = {"BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                   "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tokenizer(path: Path) -> None:
    """A word-level Hugging Face tokenizer of 1000 tokens, saved beside a model (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    tiny_llama(root / "llama", attention_dropout=0.05)
    _tokenizer(root / "llama")
    tiny_mixtral(root / "mixtral")
    return root


# (source, flags, layout facts the args must state): every layout and format we write
CASES = {
    "mcore_te_tp2_pp2": ("llama", ["--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size",
                                   "2"], dict(tp=2, pp=2, impl="transformer_engine")),
    "mcore_local_tp2_pp2": ("llama", ["--target_tensor_model_parallel_size", "2",
                                      "--target_pipeline_model_parallel_size", "2", "--transformer_impl", "local"],
                            dict(tp=2, pp=2, impl="local")),
    "legacy_tp2_pp2_bf16": ("llama", ["--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size",
                                      "2", "--megatron_format", "legacy", "--target_params_dtype", "bf16"],
                            dict(tp=2, pp=2, legacy=True, dtype="bf16")),
    "pp2_vpp2": ("llama", ["--target_pipeline_model_parallel_size", "2", "--target_virtual_pipeline_model_parallel_size",
                           "2"], dict(pp=2, vpp=2)),
    "mixtral_tp2_ep2_local": ("mixtral", ["--target_tensor_model_parallel_size", "2",
                                          "--target_expert_model_parallel_size", "2", "--transformer_impl", "local"],
                              dict(tp=2, ep=2, impl="local")),
    "mixtral_ep2_grouped_fp16": ("mixtral", ["--target_expert_model_parallel_size", "2", "--moe_grouped_gemm",
                                             "--target_params_dtype", "fp16"], dict(ep=2, grouped=True, dtype="fp16")),
    "torch_dist_tp2": ("llama", ["--megatron_ckpt_format", "torch_dist", "--target_tensor_model_parallel_size", "2"],
                       dict(tp=2, ckpt_format="torch_dist")),
    "torch_dist_mixtral": ("mixtral", ["--megatron_ckpt_format", "torch_dist"], dict(ckpt_format="torch_dist")),
}


@pytest.fixture(scope="module")
def outputs(sources, tmp_path_factory):
    """Each case converted once: name -> (its iteration dir, the state dicts holding args: every rank file,
    or common.pt)."""
    root = tmp_path_factory.mktemp("outputs")
    written = {}
    for name, (model, flags, _) in CASES.items():
        assert convert("--load_path", sources / model, "--save_path", root / name, "--to", "megatron", *flags) == 0
        files = sorted((root / name / "release").glob("*/model_optim_rng.pt")) or [root / name / "release" / "common.pt"]
        written[name] = root / name / "release", [torch.load(file, weights_only=False) for file in files]
    return written


def _missing(args, names, allow_none=frozenset()) -> list[str]:
    return [name for name in names if getattr(args, name, None) is None and not (name in allow_none and hasattr(args, name))]


@pytest.mark.parametrize("name", list(CASES))
def test_every_field_megatron_lm_loaders_read_is_present(outputs, name):
    for state in outputs[name][1]:
        args = state["args"]
        assert not _missing(args, COPIED_BY_LOAD_ARGS, NONE_MEANS_UNUSED), "load_args_from_checkpoint"
        assert not _missing(args, LOADER_REQUIRED), "loader_base.ensure_required_arguments"
        assert not _missing(args, READ_AS_ATTRIBUTES), "read as attributes by loaders, saver, check_checkpoint_args"
        # load_args_from_checkpoint: args.iteration = state_dict['iteration']; model-parallel sizes are
        # taken as such only from checkpoint_version 3.0 on (older: model_parallel_size)
        assert isinstance(state["iteration"], int) and state["checkpoint_version"] >= 3.0


def _expected(config: dict, facts: dict, source_dir: Path) -> dict:
    """What the args must say, from config.json and the conversion's flags."""
    tp, pp, ep, vpp = facts.get("tp", 1), facts.get("pp", 1), facts.get("ep", 1), facts.get("vpp", 1)
    dtype = DTYPES[facts.get("dtype", "fp32")]
    heads, groups, experts = config["num_attention_heads"], config["num_key_value_heads"], config.get("num_local_experts")
    return dict(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"], num_attention_heads=heads,
        num_query_groups=groups, group_query_attention=groups != heads, ffn_hidden_size=config["intermediate_size"],
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=config["max_position_embeddings"], seq_length=config["max_position_embeddings"],
        position_embedding_type="rope", add_position_embedding=False, use_rotary_position_embeddings=True,
        rotary_base=config["rope_parameters"]["rope_theta"], rotary_percent=1.0, rotary_interleaved=False,
        swiglu=True, squared_relu=False, normalization="RMSNorm", apply_layernorm_1p=False, add_bias_linear=False,
        disable_bias_linear=True, add_qkv_bias=False, untie_embeddings_and_output_weights=not config["tie_word_embeddings"],
        attention_dropout=config["attention_dropout"], hidden_dropout=0.0, apply_query_key_layer_scaling=False,
        sequence_parallel=False, bert_binary_head=False,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(source_dir.resolve()) if (source_dir / "tokenizer.json").exists() else None,
        padded_vocab_size=math.ceil(config["vocab_size"] / (128 * tp)) * 128 * tp, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=config["num_hidden_layers"] // (pp * vpp) if vpp > 1 else None,
        ckpt_format=facts.get("ckpt_format", "torch"), params_dtype=dtype, fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16, num_experts=experts,
        moe_router_topk=config.get("num_experts_per_tok", 2), moe_grouped_gemm=facts.get("grouped", False),
        moe_ffn_hidden_size=config["intermediate_size"] if experts else None, moe_layer_freq=1,
        moe_router_score_function="softmax", moe_router_pre_softmax=False, moe_router_enable_expert_bias=False,
        moe_shared_expert_intermediate_size=None, use_legacy_models=facts.get("legacy", False),
        **({} if facts.get("legacy") else {"transformer_impl": facts.get("impl", "transformer_engine")}),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_fields_describe_the_checkpoint(outputs, sources, name):
    model, _, facts = CASES[name]
    expected = _expected(json.loads((sources / model / "config.json").read_text()), facts, sources / model)
    release, states = outputs[name]
    for state in states:
        args = state["args"]
        assert {key: getattr(args, key, "absent") for key in expected} == expected
        assert args.tokenizer_type in TOKENIZER_TYPES
        assert _written_dtypes(release, state) == {args.params_dtype}


def _written_dtypes(release: Path, state: dict) -> set[torch.dtype]:
    """The dtypes of the weights in a rank file, or in a torch_dist checkpoint's data files."""
    if "args" in state and not any(key.startswith("model") for key in state):
        metadata = read_metadata(release).state_dict_metadata
        return {meta.properties.dtype for key, meta in metadata.items() if key.endswith(".weight")}
    return {tensor.dtype for key, model in state.items() if key.startswith("model") for tensor in _tensors(model)}


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)


def test_virtual_pipeline_survives_megatron_lm_validation(outputs):
    """arguments.validate_args: at most one of the three VPP fields, and it drops the virtual pipeline size
    unless one of them is set; load_args_from_checkpoint copies only num_layers_per_virtual_pipeline_stage."""
    state = outputs["pp2_vpp2"][1][0]
    args = state["args"]
    vpp_fields = ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                  "pipeline_model_parallel_layout")
    assert [field for field in vpp_fields if getattr(args, field, None) is not None] == [vpp_fields[0]]
    assert sorted(state) == sorted(["args", "checkpoint_version", "iteration", "model0", "model1"])


def test_tokenizer_and_lengths_from_flags(sources, tmp_path):
    spm = tmp_path / "tokenizer.model"
    spm.write_bytes(b"sentencepiece")
    assert convert("--load_path", sources / "llama", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--tokenizer_type", "Llama2Tokenizer", "--tokenizer_name", spm, "--seq_length", "96",
                   "--max_position_embeddings", "256") == 0
    args = torch.load(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.tokenizer_type, args.tokenizer_model) == ("Llama2Tokenizer", str(spm.resolve()))
    assert (args.seq_length, args.max_position_embeddings, args.vocab_size) == (96, 256, 1000)


def test_megatron_source_keeps_its_tokenizer_and_sequence_length(tmp_path):
    """Megatron-LM's own checkpoint (HuggingFaceTokenizer without a model path, seq_length 4096) reshaped."""
    assert convert("--load_path", MEGATRON_LM_TREE, "--save_path", tmp_path / "m", "--to", "megatron",
                   "--target_pipeline_model_parallel_size", "1") == 0
    state = torch.load(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert not _missing(state["args"], COPIED_BY_LOAD_ARGS, NONE_MEANS_UNUSED)
    assert not _missing(state["args"], LOADER_REQUIRED + READ_AS_ATTRIBUTES)
    assert (state["args"].tokenizer_type, state["args"].tokenizer_model, state["args"].seq_length) == (
        "HuggingFaceTokenizer", None, 4096)


def test_megatron_source_naming_no_tokenizer_gets_the_documented_default(tmp_path, capsys):
    model = tiny_gpt2(None)
    tree = reference_megatron_gpt2(model, tmp_path / "ref")
    assert convert("--load_path", tree, "--save_path", tmp_path / "m", "--to", "megatron") == 0
    args = torch.load(tmp_path / "m/release/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"]
    assert (args.tokenizer_type, args.tokenizer_model, args.seq_length) == ("NullTokenizer", None, model.config.n_positions)
    assert "names no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--to", "megatron", "--seq_length", "4096"], "exceeds max_position_embeddings"),
    (["--to", "hf", "--seq_length", "64"], "only apply to Megatron output"),
    (["--to", "hf", "--tokenizer_type", "NullTokenizer"], "only apply to Megatron output"),
])
def test_lengths_and_tokenizer_flags_refused_where_they_cannot_hold(sources, tmp_path, capsys, flags, message):
    assert convert("--load_path", sources / "llama", "--save_path", tmp_path / "m", *flags) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_learned_position_embeddings_keep_their_length(tmp_path, capsys):
    tiny_gpt2(tmp_path / "gpt2")
    assert convert("--load_path", tmp_path / "gpt2", "--save_path", tmp_path / "m", "--to", "megatron",
                   "--max_position_embeddings", "2048") == 2
    assert "learned position embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("recorded,flags,expected", [
    (("HuggingFaceTokenizer", "/hf"), (None, None), ("HuggingFaceTokenizer", "/hf")),
    (("GPT2BPETokenizer", None), (None, None), ("GPT2BPETokenizer", None)),
    ((None, None), (None, None), ("NullTokenizer", None)),
    (("GPT2BPETokenizer", None), (None, "org/name"), ("HuggingFaceTokenizer", "org/name")),
    (("HuggingFaceTokenizer", "/hf"), ("TikTokenizer", None), ("TikTokenizer", None)),
    (("SentencePieceTokenizer", "/a.model"), ("SentencePieceTokenizer", None), ("SentencePieceTokenizer", "/a.model")),
])
def test_tokenizer_choice(recorded, flags, expected):
    assert tuple(tokenizer_fields(*recorded, *flags).values()) == expected
