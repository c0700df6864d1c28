"""Llama-shaped transformers configs <-> :class:`ModelArch`: the fields Llama, Mistral, Mixtral, Qwen2 and Qwen3 share.

Rope parameters (transformers 5's ``rope_parameters``, or an older top-level ``rope_theta``), RMSNorm
epsilon, heads and ``head_dim``, biases and sliding windows; each family adds its own fields.
"""
from __future__ import annotations

from typing import Any

from checkpoint_convert.model import BadInputError, ModelArch, window_from_hf_config


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
        **window_from_hf_config(cfg, cfg.num_hidden_layers),
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
