"""The GPT-2 family table.

Hugging Face GPT-2 uses ``Conv1D`` layers, whose weights are stored transposed ([in, out]) compared
with ``nn.Linear`` and Megatron; its ``c_attn`` holds all query heads, then all keys, then all values.
Megatron fuses QKV per head ((heads, 3, head_dim) rows). Everything else maps one to one.
"""
from __future__ import annotations

from typing import Any

import torch

from checkpoint_convert.model import (BadInputError, BridgeProvider, FamilySpec, GPT_PROVIDER, ModelArch, Param, Style,
                                      Tensors, cat, pack_qkv, register, transformers_attr, unpack_qkv)

COLUMN, ROW, REPLICATED, VOCAB = Style.COLUMN, Style.ROW, Style.REPLICATED, Style.VOCAB
# transformers names for the activations Megatron implements (gelu_pytorch_tanh is gelu_new's math).
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_fast"}


def conv1d_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    return tensors[0].t()


def conv1d_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [tensor.t()]


def c_attn_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    """[hidden, 3*hidden] Conv1D (q | k | v columns) -> Megatron's per-head fused rows."""
    rows = tensors[0].t() if tensors[0].dim() == 2 else tensors[0]
    return pack_qkv(*torch.chunk(rows, 3, dim=0), arch)


def c_attn_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    rows = cat(unpack_qkv(tensor, arch), dim=0)
    return [rows.t() if rows.dim() == 2 else rows]


def _untied(arch: ModelArch) -> bool:
    return not arch.tie_embeddings


def _ln(megatron: str, hf: str) -> tuple[Param, Param]:
    return (Param(f"{megatron}.weight", (f"{hf}.weight",), REPLICATED),
            Param(f"{megatron}.bias", (f"{hf}.bias",), REPLICATED))


LAYER = (
    *_ln("input_layernorm", "ln_1"),
    Param("self_attention.linear_qkv.weight", ("attn.c_attn.weight",), COLUMN, c_attn_to_hf, c_attn_to_megatron),
    Param("self_attention.linear_qkv.bias", ("attn.c_attn.bias",), COLUMN, c_attn_to_hf, c_attn_to_megatron),
    Param("self_attention.linear_proj.weight", ("attn.c_proj.weight",), ROW, conv1d_to_hf, conv1d_to_megatron),
    Param("self_attention.linear_proj.bias", ("attn.c_proj.bias",), REPLICATED),
    *_ln("pre_mlp_layernorm", "ln_2"),
    Param("mlp.linear_fc1.weight", ("mlp.c_fc.weight",), COLUMN, conv1d_to_hf, conv1d_to_megatron),
    Param("mlp.linear_fc1.bias", ("mlp.c_fc.bias",), COLUMN),
    Param("mlp.linear_fc2.weight", ("mlp.c_proj.weight",), ROW, conv1d_to_hf, conv1d_to_megatron),
    Param("mlp.linear_fc2.bias", ("mlp.c_proj.bias",), REPLICATED),
)
FIRST = (
    Param("embedding.word_embeddings.weight", ("transformer.wte.weight",), VOCAB),
    Param("embedding.position_embeddings.weight", ("transformer.wpe.weight",), REPLICATED),
)
LAST = (
    *_ln("decoder.final_layernorm", "transformer.ln_f"),
    Param("output_layer.weight", ("lm_head.weight",), VOCAB, when=_untied),
)


def arch_from_hf_config(cfg: Any) -> ModelArch:
    activation = _ACTIVATIONS.get(cfg.activation_function)
    if activation is None:
        raise BadInputError(f"GPT-2 activation '{cfg.activation_function}' has no Megatron equivalent")
    if cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights:
        raise BadInputError("GPT-2 attention scaling options other than the default have no Megatron equivalent")
    hidden, heads = cfg.n_embd, cfg.n_head
    return ModelArch(
        family="gpt2", num_layers=cfg.n_layer, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=heads, kv_channels=hidden // heads, ffn_hidden_size=cfg.n_inner or 4 * hidden,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.n_positions, norm_epsilon=cfg.layer_norm_epsilon,
        tie_embeddings=cfg.tie_word_embeddings, normalization="LayerNorm", activation=activation,
        position_embedding_type="learned_absolute", add_bias_linear=True, add_qkv_bias=True,
        attention_dropout=float(cfg.attn_pdrop), hidden_dropout=float(cfg.resid_pdrop),
        extra={"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id},
    )


def hf_config_from_arch(arch: ModelArch) -> Any:
    last_token = arch.vocab_size - 1
    bos = arch.extra.get("bos_token_id", min(50256, last_token))
    eos = arch.extra.get("eos_token_id", min(50256, last_token))
    return transformers_attr("GPT2Config")(
        vocab_size=arch.vocab_size, n_positions=arch.max_position_embeddings, n_embd=arch.hidden_size,
        n_layer=arch.num_layers, n_head=arch.num_attention_heads, n_inner=arch.ffn_hidden_size,
        activation_function=arch.activation, layer_norm_epsilon=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_embeddings, bos_token_id=bos, eos_token_id=eos,
        architectures=["GPT2LMHeadModel"], dtype=str(arch.params_dtype).replace("torch.", ""),
    )


def matches_megatron(arch: ModelArch) -> bool:
    return (arch.normalization == "LayerNorm" and arch.activation.startswith("gelu")
            and arch.position_embedding_type == "learned_absolute" and not arch.num_experts
            and arch.num_query_groups == arch.num_attention_heads and arch.add_bias_linear
            and arch.kv_channels * arch.num_attention_heads == arch.hidden_size)


GPT2 = register(FamilySpec(
    name="gpt2", hf_model_types=("gpt2",), hf_layer_prefix="transformer.h.{layer}.",
    first_stage=FIRST, layer=LAYER, last_stage=LAST, hf_config_class="GPT2Config",
    arch_from_hf_config=arch_from_hf_config, hf_config_from_arch=hf_config_from_arch,
    matches_megatron=matches_megatron, hf_ignored_suffixes=("attn.bias", "attn.masked_bias"),
    # Megatron-Bridge (0.6) has no GPT-2 bridge; its generic GPT provider builds GPT-2's architecture
    bridge=BridgeProvider(writes=GPT_PROVIDER),
))
