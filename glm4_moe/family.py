"""The GLM-4.5 / GLM-4.5-Air family table (``glm4_moe``): grouped-query attention with biased q, k and v (no o_proj
bias) and, in GLM-4.5, per-head query/key RMSNorm (``use_qk_norm`` <-> ``qk_layernorm``); partial rotary
embeddings; DeepSeek-V3's expert layers and router (``deepseek_v3/moe.py``); multi-token prediction layers
stored as DeepSeek-V3 stores them (``deepseek_v3/mtp.py``).

| Hugging Face | megatron-core |
| --- | --- |
| ``self_attn.{q,k,v}_proj`` (+ bias with ``attention_bias``) | ``self_attention.linear_qkv`` (``add_qkv_bias``) |
| ``self_attn.q_norm`` / ``k_norm`` (``use_qk_norm``) | ``self_attention.q_layernorm`` / ``k_layernorm`` |
| ``rope_parameters.partial_rotary_factor`` (0.5) | ``rotary_percent`` |
| the first ``first_k_dense_replace`` layers' ``mlp.{gate,up,down}_proj`` | dense layers of ``moe_layer_freq`` |
| ``mlp.gate`` (sigmoid, ``e_score_correction_bias``, ``n_group`` / ``topk_group``, ``routed_scaling_factor``) | ``mlp.router`` (``expert_bias``, groups, ``moe_router_topk_scaling_factor``) |
| ``mlp.experts``, ``mlp.shared_experts`` | ``mlp.experts``, ``mlp.shared_experts`` |

Both rotate the first ``rotary_percent x head_dim`` rows of each query and key head as two halves (transformers'
``rotate_half``, megatron-core's non-interleaved rope) with the same frequencies, and pass the others through.
Megatron-Bridge writes these models as its generic ``GPTModelProvider`` (``glm/glm45_bridge.py``); older releases
wrote ``glm/glm45_provider.py``'s classes, read here.
"""
from __future__ import annotations

from typing import Any

from checkpoint_convert.model import (BadInputError, BridgeProvider, FamilySpec, GPT_PROVIDER, ModelArch, Param, Style,
                                      register, transformers_attr)
from deepseek_v3.family import is_mtp_tensor
from deepseek_v3.moe import MOE_KEYS, MOE_LAYER, moe_config_kwargs, moe_fields
from deepseek_v3.mtp import MTP_HEAD, mtp_config_kwargs
from llama.family import DENSE_MLP, FIRST, LAST, PRE_MLP_NORM, SELF_ATTENTION, arch_from_llama_config, config_kwargs, \
    is_llama_like
from qwen2_moe.family import old_layout_aliases


def _qk_norm(arch: ModelArch) -> bool:
    return arch.qk_layernorm


QK_NORM = (
    Param("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), Style.REPLICATED, when=_qk_norm),
    Param("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), Style.REPLICATED, when=_qk_norm),
)
EXTRA_KEYS = MOE_KEYS + ("num_nextn_predict_layers",)


def _partial_rotary(cfg: Any, scaling: dict | None) -> tuple[float, dict | None]:
    """(rotary_percent, rope scaling without it): transformers 5 keeps ``partial_rotary_factor`` in
    ``rope_parameters``, older config.json files at the top level."""
    params = getattr(cfg, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    factor = 1.0 if factor is None else factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise BadInputError(f"partial_rotary_factor is {factor!r}, not a fraction in (0, 1]")
    rest = {key: value for key, value in (scaling or {}).items() if key != "partial_rotary_factor"}
    return float(factor), rest or None


def from_config(cfg: Any) -> ModelArch:
    arch = arch_from_llama_config(cfg, "glm4_moe", EXTRA_KEYS)
    if arch.add_bias_linear:
        raise BadInputError("mlp_bias: GLM-4.5's MLPs have no biases")
    percent, scaling = _partial_rotary(cfg, arch.rope_scaling)
    return arch.replace(qk_layernorm=bool(getattr(cfg, "use_qk_norm", False)), rotary_percent=percent,
                        rope_scaling=scaling, **moe_fields(cfg, False))


def to_config(arch: ModelArch) -> Any:
    kwargs = config_kwargs(arch)
    kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "partial_rotary_factor": arch.rotary_percent}
    kwargs.update(moe_config_kwargs(arch, False), **mtp_config_kwargs(arch))
    return transformers_attr("Glm4MoeConfig")(architectures=["Glm4MoeForCausalLM"], attention_bias=arch.add_qkv_bias,
                                              use_qk_norm=arch.qk_layernorm, **kwargs)


def matches_megatron(arch: ModelArch) -> bool:
    """Llama-shaped, with or without query/key norms, a sigmoid router and ungated shared experts."""
    return (is_llama_like(arch, qk_norm=arch.qk_layernorm, experts=True) and not arch.add_bias_linear
            and arch.moe_router_score_function == "sigmoid" and arch.moe_shared_expert_intermediate_size is not None
            and not arch.moe_shared_expert_gate and arch.window_size is None)


_OLD_PROVIDERS = tuple(f"megatron.bridge.models.glm.glm45_provider.{name}" for name in (
    "GLMMoEModelProvider", "GLM45ModelProvider355B", "GLM45AirModelProvider106B"))

GLM4_MOE = register(FamilySpec(
    name="glm4_moe", hf_model_types=("glm4_moe",), hf_layer_prefix="model.layers.{layer}.", first_stage=FIRST,
    layer=SELF_ATTENTION + QK_NORM + PRE_MLP_NORM + DENSE_MLP + MOE_LAYER, last_stage=LAST,
    hf_config_class="Glm4MoeConfig", arch_from_hf_config=from_config, hf_config_from_arch=to_config,
    matches_megatron=matches_megatron, hf_ignored_suffixes=("rotary_emb.inv_freq",), hf_mtp_tensor=is_mtp_tensor,
    hf_aliases=old_layout_aliases, mtp_head=MTP_HEAD,
    bridge=BridgeProvider(writes=GPT_PROVIDER, reads=_OLD_PROVIDERS)))
