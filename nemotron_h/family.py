"""The Nemotron-H family table (Nemotron-H, Nemotron-Nano-2, Nemotron-3 Nano): hybrid Mamba-2 models, as
megatron-core's ``MambaModel`` trains them and transformers' ``NemotronHForCausalLM`` runs them.

Every layer is one block behind its own RMSNorm (``model.layers.N.norm``), its kind given by the pattern
(``hybrid_override_pattern``, transformers 5's ``layers_block_type``): megatron-core builds each kind as its own
layer (``ModelArch.layer_pattern``), so the layer's norm is a different Megatron tensor for each kind:

| kind | Hugging Face (``model.layers.N.``) | megatron-core (``decoder.layers.N.``) |
| --- | --- | --- |
| ``M`` Mamba-2 | ``norm``, ``mixer.{in_proj, conv1d, A_log, D, dt_bias, norm, out_proj}`` | ``norm`` (TE: ``mixer.in_proj.layer_norm_weight``), ``mixer.*`` of the same names |
| ``*`` attention (no rotary) | ``norm``, ``mixer.{q,k,v,o}_proj`` | ``input_layernorm``, ``self_attention.linear_qkv`` / ``linear_proj`` |
| ``-`` MLP, squared ReLU, not gated | ``norm``, ``mixer.{up,down}_proj`` | ``pre_mlp_layernorm``, ``mlp.linear_fc1`` / ``linear_fc2`` |
| ``E`` experts | ``norm``, ``mixer.gate``, ``mixer.experts.{up,down}_proj`` (3-D), ``mixer.shared_experts.*``, ``mixer.fc{1,2}_latent_proj`` | ``pre_mlp_layernorm``, ``mlp.router``, ``mlp.experts``, ``mlp.shared_experts``, ``mlp.fc{1,2}_latent_proj`` |

Both sides store a mixer's ``in_proj`` rows as [z, x, B, C, dt] and its convolution channels as [x, B, C]; tensor
parallelism splits each part on its own (``Style.PARTS_COLUMN``). The router is DeepSeek-V3's (sigmoid scores, a
float32 ``e_score_correction_bias`` for choosing, groups, renormalised top-k, scaled): ``deepseek_v3.moe``
translates it. transformers' ``NemotronHForCausalLM`` never ties ``lm_head`` to the embeddings (whatever
``tie_word_embeddings`` says, kept as the source wrote it), so the Megatron model is untied and a tied one refused. Published checkpoints name the model ``backbone`` and store experts one by one
(``backbone.layers.N.mixer.experts.J.up_proj.weight``): read through aliases. Megatron-Bridge records the model as
its hybrid provider, whose pattern, Mamba and stack spec fields the core writes and reads (``formats/hybrid.py``);
the family adds the scan's chunk size.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from checkpoint_convert.model import (BadInputError, BridgeProvider, FamilySpec, LAYER_KINDS, Layers, MambaSizes,
                                      ModelArch, Param, Style, qkv_to_hf, qkv_to_megatron, register, stack,
                                      transformers_attr)
from deepseek_v3.moe import moe_config_kwargs, moe_fields

COLUMN, ROW, REPLICATED, VOCAB, PARTS = Style.COLUMN, Style.ROW, Style.REPLICATED, Style.VOCAB, Style.PARTS_COLUMN
MAMBA, ATTENTION, DENSE, MOE = Layers.MAMBA, Layers.ATTENTION, Layers.DENSE, Layers.MOE
# transformers' layer type names <-> megatron-core's symbols
KIND_NAMES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _in_proj(arch: ModelArch) -> tuple[int, ...]:
    return arch.mamba.in_proj_parts()


def _conv(arch: ModelArch) -> tuple[int, ...]:
    return arch.mamba.conv_parts()


def _untied(arch: ModelArch) -> bool:
    return not arch.tie_embeddings


def _routed(arch: ModelArch) -> bool:
    return bool(arch.num_experts)


def _expert_bias(arch: ModelArch) -> bool:
    return _routed(arch) and arch.moe_router_enable_expert_bias


def _zero_bias(arch: ModelArch) -> bool:
    return _routed(arch) and not arch.moe_router_enable_expert_bias


def _experts(arch: ModelArch) -> tuple[int, ...]:
    return (arch.num_experts,)


def _latent(arch: ModelArch) -> bool:
    return _routed(arch) and arch.moe_latent_size is not None


MAMBA_LAYER = tuple(Param(megatron, (hf,), style, layers=MAMBA, parts=parts) for megatron, hf, style, parts in (
    ("norm.weight", "norm.weight", REPLICATED, None),
    ("mixer.in_proj.weight", "mixer.in_proj.weight", PARTS, _in_proj),
    ("mixer.conv1d.weight", "mixer.conv1d.weight", PARTS, _conv),
    ("mixer.conv1d.bias", "mixer.conv1d.bias", PARTS, _conv),
    ("mixer.A_log", "mixer.A_log", COLUMN, None),  # per head
    ("mixer.D", "mixer.D", COLUMN, None),
    ("mixer.dt_bias", "mixer.dt_bias", COLUMN, None),
    ("mixer.norm.weight", "mixer.norm.weight", COLUMN, None),  # grouped: whole groups per rank
    ("mixer.out_proj.weight", "mixer.out_proj.weight", ROW, None),
))
ATTENTION_LAYER = (
    Param("input_layernorm.weight", ("norm.weight",), REPLICATED, layers=ATTENTION),
    Param("self_attention.linear_qkv.weight", tuple(f"mixer.{n}_proj.weight" for n in "qkv"), COLUMN, qkv_to_hf,
          qkv_to_megatron, layers=ATTENTION),
    Param("self_attention.linear_proj.weight", ("mixer.o_proj.weight",), ROW, layers=ATTENTION),
)
MLP_LAYER = (
    Param("pre_mlp_layernorm.weight", ("norm.weight",), REPLICATED, layers=DENSE),
    Param("mlp.linear_fc1.weight", ("mixer.up_proj.weight",), COLUMN, layers=DENSE),
    Param("mlp.linear_fc2.weight", ("mixer.down_proj.weight",), ROW, layers=DENSE),
)
MOE_LAYER = (
    Param("pre_mlp_layernorm.weight", ("norm.weight",), REPLICATED, when=_routed, layers=MOE),
    Param("mlp.router.weight", ("mixer.gate.weight",), REPLICATED, when=_routed, layers=MOE, float32=True),
    Param("mlp.router.expert_bias", ("mixer.gate.e_score_correction_bias",), REPLICATED, when=_expert_bias,
          layers=MOE, float32=True),
    Param("mlp.router.expert_bias", ("mixer.gate.e_score_correction_bias",), REPLICATED, when=_zero_bias,
          layers=MOE, zero_in_megatron=_experts, float32=True),
    Param("mlp.experts.local_experts.{expert}.linear_fc1.weight", ("mixer.experts.up_proj",), COLUMN, experts=True,
          when=_routed, layers=MOE),
    Param("mlp.experts.local_experts.{expert}.linear_fc2.weight", ("mixer.experts.down_proj",), ROW, experts=True,
          when=_routed, layers=MOE),
    Param("mlp.shared_experts.linear_fc1.weight", ("mixer.shared_experts.up_proj.weight",), COLUMN, when=_routed,
          layers=MOE),
    Param("mlp.shared_experts.linear_fc2.weight", ("mixer.shared_experts.down_proj.weight",), ROW, when=_routed,
          layers=MOE),
    # megatron-core's latent projections are duplicated on every tensor-parallel rank (TELinear "duplicated")
    Param("mlp.fc1_latent_proj.weight", ("mixer.fc1_latent_proj.weight",), REPLICATED, when=_latent, layers=MOE),
    Param("mlp.fc2_latent_proj.weight", ("mixer.fc2_latent_proj.weight",), REPLICATED, when=_latent, layers=MOE),
)
FIRST = (Param("embedding.word_embeddings.weight", ("model.embeddings.weight",), VOCAB),)
LAST = (
    Param("decoder.final_norm.weight", ("model.norm_f.weight",), REPLICATED),  # MambaStack's final_norm
    Param("output_layer.weight", ("lm_head.weight",), VOCAB, when=_untied),
)
# config keys with no Megatron field, carried through Megatron (args' hf_extra_config) for a round trip
EXTRA_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "num_logits_to_keep", "use_mamba_kernels",
              "mamba_hidden_act", "expand", "time_step_min", "time_step_max", "time_step_limit", "time_step_floor",
              "chunk_size", "mamba_ssm_cache_dtype", "n_shared_experts", "moe_shared_expert_overlap",
              "output_router_logits", "initializer_range", "residual_in_fp32", "rescale_prenorm_residual",
              "hidden_dropout", "sliding_window", "mtp_layers_block_type", "tie_word_embeddings")
# what megatron-core's MambaModel fixes, which a config must say too
FIXED = {"mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "use_conv_bias": True, "use_bias": False,
         "mamba_proj_bias": False, "attention_bias": False, "mlp_bias": False, "num_nextn_predict_layers": 0}


def _pattern(cfg: Any) -> str:
    kinds = getattr(cfg, "layers_block_type", None)
    if kinds is None:  # config.json of a published checkpoint
        return cfg.hybrid_override_pattern
    names = {name: symbol for symbol, name in KIND_NAMES.items()}
    if not isinstance(kinds, list) or not set(kinds) <= set(names):
        raise BadInputError(f"layers_block_type is {kinds!r}, not a list of {', '.join(names)}")
    return "".join(names[kind] for kind in kinds)


def _check_fixed(cfg: Any) -> None:
    for key, value in FIXED.items():
        if getattr(cfg, key, value) != value:
            raise BadInputError(f"{key} is {getattr(cfg, key)!r}; megatron-core's hybrid model has {value!r}")


def _moe(cfg: Any, pattern: str) -> dict[str, Any]:
    """The expert layers' fields: DeepSeek-V3's router (``moe_fields``), Nemotron-H's own shared expert size and
    latent projection."""
    if "E" not in pattern:
        return {}
    fields = moe_fields(cfg, v2=False)
    fields.update(moe_layers=None, moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
                  moe_latent_size=cfg.moe_latent_size)
    return fields


def arch_from_hf_config(cfg: Any) -> ModelArch:
    _check_fixed(cfg)
    pattern = _pattern(cfg)
    return ModelArch(
        family="nemotron_h", num_layers=len(pattern), hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim, ffn_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, norm_epsilon=cfg.layer_norm_epsilon,
        tie_embeddings=False, normalization="RMSNorm", activation="squared_relu",
        position_embedding_type="none", add_bias_linear=False, add_qkv_bias=False,
        attention_dropout=float(cfg.attention_dropout), hidden_dropout=0.0, layer_pattern=pattern,
        mamba=MambaSizes(state_dim=cfg.ssm_state_size, head_dim=cfg.mamba_head_dim, num_groups=cfg.n_groups,
                         num_heads=cfg.mamba_num_heads, conv_kernel=cfg.conv_kernel),
        extra={key: getattr(cfg, key, None) for key in EXTRA_KEYS}, **_moe(cfg, pattern),
    )


def _moe_kwargs(arch: ModelArch) -> dict[str, Any]:
    if not arch.num_experts:
        return {}
    kwargs = moe_config_kwargs(arch.replace(moe_shared_expert_intermediate_size=arch.moe_ffn_hidden_size), v2=False)
    kwargs.pop("first_k_dense_replace")
    return dict(kwargs, n_shared_experts=arch.extra.get("n_shared_experts") or 1, moe_latent_size=arch.moe_latent_size,
                moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size)


def hf_config_from_arch(arch: ModelArch) -> Any:
    if arch.layer_pattern is None or arch.mamba is None:
        raise BadInputError("a Nemotron-H model is hybrid: the source records no layer pattern or Mamba sizes")
    if arch.activation != "squared_relu" or arch.normalization != "RMSNorm" or arch.add_bias_linear:
        raise BadInputError(f"Nemotron-H's MLPs are unbiased squared ReLU behind RMSNorm; this model has "
                            f"{arch.activation}, {arch.normalization}, bias {arch.add_bias_linear}")
    if arch.tie_embeddings:  # transformers 5.25's NemotronHForCausalLM: _tied_weights_keys = {}
        raise BadInputError("the output layer is tied to the embeddings; transformers' Nemotron-H never ties them "
                            "(whatever tie_word_embeddings says), so its lm_head would be left random")
    mamba = arch.mamba
    extra = {key: value for key, value in arch.extra.items() if value is not None}
    return transformers_attr("NemotronHConfig")(
        architectures=["NemotronHForCausalLM"], vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        layers_block_type=[KIND_NAMES[symbol] for symbol in arch.layer_pattern],
        num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels, intermediate_size=arch.ffn_hidden_size,
        max_position_embeddings=arch.max_position_embeddings, layer_norm_epsilon=arch.norm_epsilon,
        attention_dropout=arch.attention_dropout,
        ssm_state_size=mamba.state_dim, mamba_head_dim=mamba.head_dim, n_groups=mamba.num_groups,
        mamba_num_heads=mamba.num_heads, conv_kernel=mamba.conv_kernel,
        dtype=str(arch.params_dtype).replace("torch.", ""), **{**extra, **_moe_kwargs(arch)},
    )


def matches_megatron(arch: ModelArch) -> bool:
    """Every hybrid (Mamba) model is one."""
    return arch.layer_pattern is not None


_BACKBONE = re.compile(r"^backbone\.(.+)$")
_PER_EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts\.)(\d+)\.(up|down)_proj\.weight$")


def published_aliases(names: list[str]) -> dict[str, tuple[list[str], Callable]]:
    """transformers 5's names for a published checkpoint's (``backbone.*``, experts one by one, stacked)."""
    aliases: dict[str, tuple[list[str], Callable]] = {}
    experts: dict[tuple[str, str], int] = {}
    for name in names:
        expert = _PER_EXPERT.match(name)
        if expert:
            key = (expert.group(1), expert.group(3))
            experts[key] = max(experts.get(key, 0), int(expert.group(2)) + 1)
        elif _BACKBONE.match(name):
            aliases["model." + name[len("backbone."):]] = ([name], _first)
    for (prefix, part), count in experts.items():
        aliases[f"model.{prefix[len('backbone.'):]}{part}_proj"] = (
            [f"{prefix}{e}.{part}_proj.weight" for e in range(count)], stack)
    return aliases


def _first(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


# Megatron-Bridge 0.6's NemotronHBridge writes HybridModelProvider (models/hybrid/hybrid_provider.py); earlier
# releases wrote NemotronHModelProvider (models/nemotronh/nemotron_h_provider.py, a MambaModelProvider) or a sized
# subclass of it, the same fields with the sizes as defaults
_OLD_PROVIDERS = tuple(f"megatron.bridge.models.nemotronh.nemotron_h_provider.{name}" for name in (
    "NemotronHModelProvider", "NemotronHModelProvider4B", "NemotronHModelProvider8B", "NemotronHModelProvider47B",
    "NemotronHModelProvider56B", "NemotronNanoModelProvider9Bv2", "NemotronNanoModelProvider12Bv2",
    "Nemotron3NanoProvider", "Nemotron3SuperProvider", "NemotronHModel4BProvider", "NemotronHModel8BProvider",
    "NemotronHModel47BProvider", "NemotronHModel56BProvider", "NemotronNano9Bv2Provider",
    "NemotronNano12Bv2Provider"))


def _chunk_to_provider(arch: ModelArch) -> dict[str, Any]:
    """The scan's chunk size (NemotronHBridge's CONFIG_MAPPING: chunk_size <-> mamba_chunk_size)."""
    chunk = arch.extra.get("chunk_size")
    return {} if chunk is None else {"mamba_chunk_size": chunk}


def _chunk_from_provider(model: dict[str, Any]) -> dict[str, Any]:
    return {"chunk_size": model.get("mamba_chunk_size")}


NEMOTRON_H = register(FamilySpec(
    name="nemotron_h", hf_model_types=("nemotron_h",), hf_layer_prefix="model.layers.{layer}.",
    first_stage=FIRST, layer=MAMBA_LAYER + ATTENTION_LAYER + MLP_LAYER + MOE_LAYER, last_stage=LAST,
    hf_config_class="NemotronHConfig", arch_from_hf_config=arch_from_hf_config, hf_config_from_arch=hf_config_from_arch,
    matches_megatron=matches_megatron, hf_aliases=published_aliases,
    bridge=BridgeProvider(writes="megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider",
                          reads=("megatron.bridge.models.mamba.mamba_provider.MambaModelProvider", *_OLD_PROVIDERS),
                          to_provider=_chunk_to_provider, from_provider=_chunk_from_provider),
))
assert set(KIND_NAMES) == set(LAYER_KINDS)
