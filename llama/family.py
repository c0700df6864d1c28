"""The Llama family table: the template to copy when adding a new family.

Only two things differ from a one-to-one mapping:
- Megatron fuses q, k and v into one ``linear_qkv`` grouped by query group (GQA) -> core's
  ``pack_qkv``/``unpack_qkv``;
- Megatron fuses the SwiGLU gate and up projections into one ``linear_fc1`` whose rows are
  [gate; up] (per tensor-parallel rank: the core's ``GLU_COLUMN`` style handles that).
Hugging Face Llama and Megatron share the non-interleaved rotary convention, so q and k need no
permutation. Mistral is the same table with MistralConfig (sliding window carried in ``extra``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from checkpoint_convert.arch import ModelArch
from checkpoint_convert.errors import BadInputError
from checkpoint_convert.family import (GPT_PROVIDER, BridgeProvider, FamilySpec, Param, Tensors, pack_qkv, register,
                                       unpack_qkv)
from checkpoint_convert.parallel import Style, cat
from checkpoint_convert.runtime import transformers_attr

COLUMN, ROW, REPLICATED, VOCAB, GLU = Style.COLUMN, Style.ROW, Style.REPLICATED, Style.VOCAB, Style.GLU_COLUMN


def qkv_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    return pack_qkv(*tensors, arch)


def qkv_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return unpack_qkv(tensor, arch)


def gate_up_to_megatron(tensors: Tensors, arch: ModelArch) -> torch.Tensor:
    return cat(tensors, dim=0)


def gate_up_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return list(torch.chunk(tensor, 2, dim=0))


def _biased(arch: ModelArch) -> bool:
    return arch.add_bias_linear


def _qkv_biased(arch: ModelArch) -> bool:
    return arch.add_qkv_bias


def _only_qkv_biased(arch: ModelArch) -> bool:
    """Megatron's add_qkv_bias alone: Hugging Face's attention_bias also biases o_proj, kept at zero."""
    return arch.add_qkv_bias and not arch.add_bias_linear


def _hidden(arch: ModelArch) -> tuple[int, ...]:
    return (arch.hidden_size,)


def _untied(arch: ModelArch) -> bool:
    return not arch.tie_embeddings


QKV_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTENTION = (
    Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
    Param("self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in QKV_NAMES), COLUMN,
          qkv_to_hf, qkv_to_megatron),
    Param("self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in QKV_NAMES), COLUMN,
          qkv_to_hf, qkv_to_megatron, when=_qkv_biased),
    Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
    Param("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), REPLICATED, when=_biased),
    Param("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), REPLICATED, when=_only_qkv_biased,
          zero_in_megatron=_hidden),
    Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),
)
DENSE_MLP = (
    Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU,
          gate_up_to_hf, gate_up_to_megatron),
    Param("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), GLU,
          gate_up_to_hf, gate_up_to_megatron, when=_biased),
    Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
    Param("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), REPLICATED, when=_biased),
)
FIRST = (Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),)
LAST = (
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    Param("output_layer.weight", ("lm_head.weight",), VOCAB, when=_untied),
)


def _rope_from_config(cfg: Any) -> tuple[float, dict | None]:
    """(rope base, scaling parameters or None) from a transformers 5 ``rope_parameters`` dict."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    base = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0) or 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else None
    return base, scaling


def _biases(cfg: Any) -> tuple[bool, bool]:
    """(qkv biased, every linear biased). attention_bias alone maps to Megatron's add_qkv_bias."""
    attention, mlp = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    if mlp and not attention:
        raise BadInputError("mlp_bias without attention_bias has no Megatron equivalent")
    return attention, mlp


def arch_from_llama_config(cfg: Any, family: str, extra_keys: tuple[str, ...]) -> ModelArch:
    if cfg.hidden_act != "silu":
        raise BadInputError(f"hidden_act '{cfg.hidden_act}' is not SwiGLU's silu")
    base, scaling = _rope_from_config(cfg)
    heads = cfg.num_attention_heads
    qkv_biased, biased = _biases(cfg)
    return ModelArch(
        family=family, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=heads,
        num_query_groups=cfg.num_key_value_heads or heads,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        ffn_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, norm_epsilon=cfg.rms_norm_eps,
        tie_embeddings=bool(cfg.tie_word_embeddings), normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope", rotary_base=base, rope_scaling=scaling, add_bias_linear=biased,
        add_qkv_bias=qkv_biased, attention_dropout=float(cfg.attention_dropout), hidden_dropout=0.0,
        extra={key: getattr(cfg, key, None) for key in ("bos_token_id", "eos_token_id", *extra_keys)},
    )


def config_kwargs(arch: ModelArch) -> dict[str, Any]:
    """Keyword arguments every Llama-like transformers config takes."""
    rope = {"rope_theta": arch.rotary_base, "rope_type": "default", **(arch.rope_scaling or {})}
    return dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.kv_channels,
        max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.norm_epsilon,
        rope_parameters=rope, tie_word_embeddings=arch.tie_embeddings, hidden_act="silu",
        dtype=str(arch.params_dtype).replace("torch.", ""),
        **{k: v for k, v in arch.extra.items() if v is not None},
    )


def is_llama_like(arch: ModelArch) -> bool:
    return (arch.normalization == "RMSNorm" and arch.activation == "swiglu"
            and arch.position_embedding_type == "rope" and not arch.num_experts)


def llama_like_family(name: str, config_class: str, architecture: str, extra_keys: tuple[str, ...] = (),
                      bias_kwargs: Callable[[ModelArch], dict] = lambda arch: {},
                      bridge: BridgeProvider | None = None) -> FamilySpec:
    """A dense Llama-shaped family; only its transformers config class and extra config keys differ."""
    def from_config(cfg: Any) -> ModelArch:
        return arch_from_llama_config(cfg, name, extra_keys)

    def to_config(arch: ModelArch) -> Any:
        cls = transformers_attr(config_class)
        return cls(architectures=[architecture], **config_kwargs(arch), **bias_kwargs(arch))

    return FamilySpec(
        name=name, hf_model_types=(name,), hf_layer_prefix="model.layers.{layer}.",
        first_stage=FIRST, layer=ATTENTION + DENSE_MLP, last_stage=LAST, hf_config_class=config_class,
        arch_from_hf_config=from_config, hf_config_from_arch=to_config, matches_megatron=is_llama_like,
        hf_ignored_suffixes=("rotary_emb.inv_freq",), bridge=bridge,
    )


def _llama_biases(arch: ModelArch) -> dict:
    return {"attention_bias": arch.add_qkv_bias, "mlp_bias": arch.add_bias_linear}


# Megatron-Bridge 0.4 and later write Llama as its generic GPTModelProvider; 0.1-0.3 wrote these subclasses.
_OLD_LLAMA_PROVIDERS = tuple(f"megatron.bridge.models.llama.llama_provider.{name}" for name in (
    "LlamaModelProvider", "Llama2ModelProvider7B", "Llama2ModelProvider13B", "Llama2ModelProvider70B",
    "Llama3ModelProvider", "Llama31ModelProvider", "Llama3ModelProvider8B", "Llama3ModelProvider70B",
    "Llama31ModelProvider8B", "Llama31ModelProvider70B", "Llama31ModelProvider405B", "Llama32ModelProvider1B",
    "Llama32ModelProvider3B", "CodeLlamaModelProvider7B", "CodeLlamaModelProvider13B", "CodeLlamaModelProvider34B",
    "CodeLlamaModelProvider70B"))
_MISTRAL_PROVIDER = "megatron.bridge.models.mistral.mistral_provider."


def _mistral_window(arch: ModelArch) -> dict[str, Any]:
    """Megatron's sliding window is (tokens before, tokens after) the current one; Hugging Face's counts it too."""
    window = arch.extra.get("sliding_window")
    return {"window_size": [window - 1, 0], "cp_comm_type": "a2a"} if window else {"window_size": None}


def _mistral_sliding_window(model: dict[str, Any]) -> dict[str, Any]:
    window = model.get("window_size")
    if window is not None and not (isinstance(window, (list, tuple)) and len(window) == 2 and window[1] == 0):
        raise BadInputError(f"window_size {window!r} is not a causal sliding window [before, 0]")
    return {"sliding_window": window[0] + 1 if window else None}


LLAMA = register(llama_like_family("llama", "LlamaConfig", "LlamaForCausalLM", bias_kwargs=_llama_biases,
                                   bridge=BridgeProvider(writes=GPT_PROVIDER, reads=_OLD_LLAMA_PROVIDERS)))
MISTRAL = register(llama_like_family(
    "mistral", "MistralConfig", "MistralForCausalLM", extra_keys=("sliding_window",),
    bridge=BridgeProvider(writes=_MISTRAL_PROVIDER + "MistralModelProvider",
                          reads=(_MISTRAL_PROVIDER + "MistralSmall3ModelProvider24B",), fields=("window_size",),
                          to_provider=_mistral_window, from_provider=_mistral_sliding_window)))
