"""DeepSeek-V3 and DeepSeek-V2 (and the models built on them): multi-latent attention (MLA); the expert layers
(DeepSeekMoE) are in ``moe.py``.

transformers' ``self_attn`` and megatron-core's ``MLASelfAttention`` (``multi_latent_attention``) hold the
same projections with the same row layouts, so each maps one to one:

| Hugging Face (``self_attn.``) | megatron-core (``self_attention.``) | rows |
| --- | --- | --- |
| ``q_a_proj`` / ``q_a_layernorm`` | ``linear_q_down_proj`` / ``q_layernorm`` | q_lora_rank |
| ``q_b_proj`` (``q_proj`` when q_lora_rank is null) | ``linear_q_up_proj`` (``linear_q_proj``) | per head [nope; rope] |
| ``kv_a_proj_with_mqa`` / ``kv_a_layernorm`` | ``linear_kv_down_proj`` / ``kv_layernorm`` | [kv_lora_rank; rope] |
| ``kv_b_proj`` | ``linear_kv_up_proj`` | per head [k nope; v] |
| ``o_proj`` | ``linear_proj`` | hidden |

Up projections are column-parallel (whole heads per rank); down projections are column-parallel in the
local spec and a full copy per rank under Transformer Engine, which fuses ``q_layernorm`` and
``kv_layernorm`` into the up projections (``layer_norm_weight``) and keeps ``input_layernorm`` apart.
Rotary: megatron-core's MLA takes each head's rotary rows as interleaved pairs (``rope_utils`` gathers
``0::2`` and ``1::2`` before rotating), as DeepSeek's weights are: ``rope_interleave: true`` (V3's
default) and V2's complex rotation need no change; with ``rope_interleave: false`` the rotary rows of
``q_b_proj`` and ``kv_a_proj_with_mqa`` are permuted. YaRN scaling maps to MLA's ``rope_type yarn``.
"""
from __future__ import annotations

from typing import Any

import torch

from checkpoint_convert.model import (BadInputError, BridgeProvider, FamilySpec, LatentAttention, ModelArch, Param,
                                      Style, register, transformers_attr)
from llama.family import DENSE_MLP, FIRST, LAST, PRE_MLP_NORM, arch_from_llama_config, config_kwargs

from qwen2_moe.family import old_layout_aliases

from .hf_config import SHARED_KEYS, check_supported
from .kimi import KIMI_MODEL_TYPES, SOURCE_CONFIG, source_config, source_config_kwargs
from .moe import MOE_LAYER, moe_config_kwargs, moe_fields
from .mtp import MTP_HEAD, mtp_config_kwargs

COLUMN, ROW, REPLICATED = Style.COLUMN, Style.ROW, Style.REPLICATED


def _rope_permutation(arch: ModelArch, inverse: bool) -> torch.Tensor | None:
    """Rotary rows Hugging Face -> Megatron (megatron[2i] = hf[i], megatron[2i+1] = hf[d/2 + i]); None: same."""
    if arch.extra.get("rope_interleave", True):
        return None
    width = arch.mla.qk_pos_emb_head_dim
    order = torch.arange(width).reshape(2, width // 2).t().reshape(-1)
    return torch.argsort(order) if inverse else order


def _permute_rope_rows(tensor: torch.Tensor, arch: ModelArch, block: int, inverse: bool) -> torch.Tensor:
    """Permute the last ``qk_pos_emb_head_dim`` rows of every ``block`` rows (a head, or the kv latent)."""
    order = _rope_permutation(arch, inverse)
    if order is None or tensor.device.type == "meta":
        return tensor
    blocks = tensor.reshape(-1, block, tensor.shape[-1])
    rope = blocks[:, block - len(order):][:, order]
    return torch.cat([blocks[:, :block - len(order)], rope], dim=1).reshape(tensor.shape)


def _q_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    return _permute_rope_rows(tensors[0], arch, arch.mla.q_head_dim, inverse=False)


def _q_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [_permute_rope_rows(tensor, arch, arch.mla.q_head_dim, inverse=True)]


def _kv_down_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    return _permute_rope_rows(tensors[0], arch, tensors[0].shape[0], inverse=False)


def _kv_down_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [_permute_rope_rows(tensor, arch, tensor.shape[0], inverse=True)]


def _q_lora(arch: ModelArch) -> bool:
    return arch.mla.q_lora_rank is not None


def _no_q_lora(arch: ModelArch) -> bool:
    return arch.mla.q_lora_rank is None


ATTN = "self_attention."
MLA = (
    Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
    Param(ATTN + "linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), Style.COLUMN_UNLESS_TE, when=_q_lora),
    Param(ATTN + "q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), REPLICATED, when=_q_lora),
    Param(ATTN + "linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), COLUMN, _q_to_hf, _q_to_megatron,
          when=_q_lora),
    Param(ATTN + "linear_q_proj.weight", ("self_attn.q_proj.weight",), COLUMN, _q_to_hf, _q_to_megatron,
          when=_no_q_lora),
    Param(ATTN + "linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",), Style.COLUMN_UNLESS_TE,
          _kv_down_to_hf, _kv_down_to_megatron),
    Param(ATTN + "kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), REPLICATED),
    Param(ATTN + "linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), COLUMN),
    Param(ATTN + "linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
)

def is_mtp_tensor(arch: ModelArch, name: str) -> bool:
    """DeepSeek stores multi-token prediction layer k as decoder layer ``num_hidden_layers + k``."""
    parts = name.split(".")
    return len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= arch.num_layers


def _is_v2(arch: ModelArch) -> bool:
    """V2's config keys (recorded in the args) tell V2 from V3; without our records, a softmax router is V2's."""
    if {"topk_method", "rope_interleave"} & set(arch.extra):
        return "topk_method" in arch.extra
    return bool(arch.num_experts) and arch.moe_router_score_function == "softmax"


# Megatron-Bridge 0.4 and later write V2 and V3 (and Kimi K2) as MLAModelProvider, its fields read by the core as
# any provider's (MLA sizes and YaRN, experts and routing: checkpoint_convert/formats/bridge_config.py); the architecture
# tells V2 from V3. 0.2-0.3 wrote per-model subclasses (deepseek/deepseek_provider.py; the *Provider names their
# deprecated aliases); Moonlight is a DeepSeek-V3 model.
MLA_PROVIDER = "megatron.bridge.models.mla_provider.MLAModelProvider"
_OLD_PROVIDERS = "megatron.bridge.models.deepseek.deepseek_provider."
_OLD_V3_PROVIDERS = tuple(_OLD_PROVIDERS + name for name in (
    "DeepSeekV3ModelProvider", "DeepSeekV3Provider", "MoonlightModelProvider16B", "MoonlightProvider")) + (
    "megatron.bridge.models.kimi.kimi_provider.KimiK2Provider",)  # Kimi-K2: a DeepSeek-V3 model
_OLD_V2_PROVIDERS = tuple(_OLD_PROVIDERS + name for name in (
    "DeepSeekV2ModelProvider", "DeepSeekV2Provider", "DeepSeekV2LiteModelProvider", "DeepSeekV2LiteProvider"))


def deepseek_family(name: str, config_class: str, architecture: str, extra_keys: tuple[str, ...],
                    old_providers: tuple[str, ...]) -> FamilySpec:
    """A DeepSeek family (V2 or V3 config class): MLA layers, dense SwiGLU MLPs in the first layers, then experts."""
    v2 = "topk_method" in extra_keys

    def from_config(cfg: Any) -> ModelArch:
        arch = arch_from_llama_config(cfg, name, SHARED_KEYS + extra_keys)
        check_supported(cfg, arch)
        mla = LatentAttention(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                              qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
                              v_head_dim=cfg.v_head_dim)
        arch.extra.update(source_config(cfg))  # Kimi-K2: the source's own model type and keys
        return arch.replace(mla=mla, kv_channels=mla.q_head_dim, qk_layernorm=True, **moe_fields(cfg, v2))

    def to_config(arch: ModelArch) -> Any:
        if arch.mla is None:
            raise BadInputError(f"a {name} model has multi-latent attention; this source has none")
        kwargs = {key: value for key, value in config_kwargs(arch).items() if key not in ("head_dim", SOURCE_CONFIG)}
        kwargs.update(moe_config_kwargs(arch, v2), **(mtp_config_kwargs(arch) if not v2 else {}))
        source_class, source_kwargs = source_config_kwargs(arch.extra)
        kwargs = {"architectures": [architecture], **kwargs, **source_kwargs}
        mla = arch.mla
        return (source_class or transformers_attr(config_class))(
            q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_head_dim, qk_rope_head_dim=mla.qk_pos_emb_head_dim, v_head_dim=mla.v_head_dim,
            attention_bias=False, **kwargs)

    def matches(arch: ModelArch) -> bool:
        return arch.mla is not None and _is_v2(arch) == v2

    return FamilySpec(
        name=name, hf_model_types=(name,) if v2 else (name, *KIMI_MODEL_TYPES), hf_layer_prefix="model.layers.{layer}.", first_stage=FIRST,
        layer=MLA + PRE_MLP_NORM + DENSE_MLP + MOE_LAYER, last_stage=LAST, hf_config_class=config_class,
        arch_from_hf_config=from_config, hf_config_from_arch=to_config, matches_megatron=matches,
        hf_ignored_suffixes=("rotary_emb.inv_freq",), hf_mtp_tensor=is_mtp_tensor, hf_aliases=old_layout_aliases,
        mtp_head=() if v2 else MTP_HEAD,
        bridge=BridgeProvider(writes=MLA_PROVIDER, reads=old_providers, fields=("multi_latent_attention",)))


DEEPSEEK_V3 = register(deepseek_family("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                                       ("rope_interleave", "num_nextn_predict_layers"), _OLD_V3_PROVIDERS))
DEEPSEEK_V2 = register(deepseek_family("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
                                       ("topk_method", "mlp_bias"), _OLD_V2_PROVIDERS))
