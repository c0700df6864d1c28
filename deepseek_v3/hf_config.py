"""DeepSeek transformers configs: what megatron-core's multi-latent attention can hold, and the keys carried as
they are (the expert layers' keys, as the source spelled them, and multi-token prediction, kept in the args'
``hf_extra_config``)."""
from __future__ import annotations

from typing import Any

from checkpoint_convert.model import BadInputError, ModelArch

from .moe import MOE_KEYS

# config values carried as they are: a round trip writes the source's spelling of its expert layers (moe.py), and a
# dense model's (first_k_dense_replace = num_hidden_layers) unused expert keys
SHARED_KEYS = MOE_KEYS
YARN_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim"}


def _check_sizes(cfg: Any) -> None:
    """The latent sizes are whole numbers of at least 1 (``q_lora_rank`` may be null); rotary rows come in pairs."""
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank"):
        value = getattr(cfg, key)
        if (value is not None or key != "q_lora_rank") and (not isinstance(value, int) or isinstance(value, bool)
                                                             or value < 1):
            raise BadInputError(f"{key} is {value!r}, not a whole number of at least 1")
    if cfg.qk_rope_head_dim % 2:
        raise BadInputError(f"qk_rope_head_dim is {cfg.qk_rope_head_dim}, not even (rotary rows come in pairs)")


def check_supported(cfg: Any, arch: ModelArch) -> None:
    """What megatron-core's MLA cannot hold, refused with one line."""
    _check_sizes(cfg)
    if arch.add_qkv_bias or arch.add_bias_linear:
        raise BadInputError("attention_bias/mlp_bias: megatron-core's multi-latent attention has no biases")
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        raise BadInputError(f"num_key_value_heads {cfg.num_key_value_heads} differs from num_attention_heads "
                            f"{cfg.num_attention_heads}: multi-latent attention has one key and value per head")
    scaling = arch.rope_scaling or {}
    if scaling and (scaling.get("rope_type") != "yarn" or set(scaling) - YARN_KEYS):
        raise BadInputError(f"rope scaling {scaling} is not one megatron-core's MLA applies (yarn with factor, "
                            "original_max_position_embeddings, beta_fast/slow, mscale, mscale_all_dim)")
