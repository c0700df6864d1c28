"""The Llama family table: the template to copy when adding a new family.

Only two things differ from a one-to-one mapping:
- Megatron fuses q, k and v into one ``linear_qkv`` grouped by query group (GQA) -> core's
  ``pack_qkv``/``unpack_qkv``;
- Megatron fuses the SwiGLU gate and up projections into one ``linear_fc1`` whose rows are
  [gate; up] (per tensor-parallel rank: the core's ``GLU_COLUMN`` style handles that).
Hugging Face Llama and Megatron share the non-interleaved rotary convention, so q and k need no
permutation. Mistral is the same table with MistralConfig (its sliding window on every layer is
Megatron's ``window_size``). ``llama_like_family`` builds such a family from a config class; Qwen2
and Qwen3 use it with their own layer tables and fixed architecture fields.
"""
from __future__ import annotations

from typing import Any, Callable

from checkpoint_convert.model import (BridgeProvider, FamilySpec, GPT_PROVIDER, Layers, ModelArch, Param, Style,
                                      every_layer_window_kwargs, gate_up_to_hf, gate_up_to_megatron, qkv_to_hf,
                                      qkv_to_megatron, register, transformers_attr)

from .hf_config import arch_from_llama_config, config_kwargs

COLUMN, ROW, REPLICATED, VOCAB, GLU = Style.COLUMN, Style.ROW, Style.REPLICATED, Style.VOCAB, Style.GLU_COLUMN
DENSE = Layers.DENSE


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
SELF_ATTENTION = (
    Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
    Param("self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in QKV_NAMES), COLUMN,
          qkv_to_hf, qkv_to_megatron),
    Param("self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in QKV_NAMES), COLUMN,
          qkv_to_hf, qkv_to_megatron, when=_qkv_biased),
    Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
)
OUT_BIAS = (  # Hugging Face's attention_bias also biases o_proj
    Param("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), REPLICATED, when=_biased),
    Param("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), REPLICATED, when=_only_qkv_biased,
          zero_in_megatron=_hidden),
)
PRE_MLP_NORM = (Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),)
ATTENTION = SELF_ATTENTION + OUT_BIAS + PRE_MLP_NORM
DENSE_MLP = (  # in every layer of a dense model; in the dense layers of a mixture of experts
    Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU,
          gate_up_to_hf, gate_up_to_megatron, layers=DENSE),
    Param("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), GLU,
          gate_up_to_hf, gate_up_to_megatron, when=_biased, layers=DENSE),
    Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW, layers=DENSE),
    Param("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), REPLICATED, when=_biased, layers=DENSE),
)
FIRST = (Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),)
LAST = (
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    Param("output_layer.weight", ("lm_head.weight",), VOCAB, when=_untied),
)


def is_llama_like(arch: ModelArch, qk_norm: bool = False, experts: bool = False) -> bool:
    """A Llama-shaped Megatron model, with or without query/key norms and experts (sliding windows are each
    family's to accept)."""
    return (arch.normalization == "RMSNorm" and arch.activation == "swiglu" and arch.position_embedding_type == "rope"
            and bool(arch.num_experts) == experts and arch.qk_layernorm == qk_norm and arch.mla is None)


def _no_window(arch: ModelArch) -> bool:
    return is_llama_like(arch) and arch.window_size is None


def llama_like_family(name: str, config_class: str, architecture: str, extra_keys: tuple[str, ...] = (),
                      config_extras: Callable[[ModelArch], dict] = lambda arch: {},
                      layer: tuple[Param, ...] = ATTENTION + DENSE_MLP, fixed: dict[str, Any] | None = None,
                      matches: Callable[[ModelArch], bool] = _no_window,
                      bridge: BridgeProvider | None = None, arch_extras: Callable[[Any], dict] = lambda cfg: {},
                      hf_aliases: Callable | None = None) -> FamilySpec:
    """A Llama-shaped family: its transformers config class, extra config keys and layer table.

    ``fixed``: architecture fields the family always has whatever its config says (e.g. biased qkv);
    ``arch_extras``: architecture fields read from the config beyond the Llama ones (e.g. experts);
    ``config_extras``: the config class's keyword arguments for what ``config_kwargs`` does not cover;
    ``bridge``: the Megatron-Bridge provider class the family's models are recorded as; ``hf_aliases``:
    older Hugging Face layouts (``FamilySpec.hf_aliases``).
    """
    def from_config(cfg: Any) -> ModelArch:
        return arch_from_llama_config(cfg, name, extra_keys).replace(**{**arch_extras(cfg), **(fixed or {})})

    def to_config(arch: ModelArch) -> Any:
        cls = transformers_attr(config_class)
        return cls(architectures=[architecture], **{**config_kwargs(arch), **config_extras(arch)})

    return FamilySpec(
        name=name, hf_model_types=(name,), hf_layer_prefix="model.layers.{layer}.",
        first_stage=FIRST, layer=layer, last_stage=LAST, hf_config_class=config_class,
        arch_from_hf_config=from_config, hf_config_from_arch=to_config, matches_megatron=matches,
        hf_ignored_suffixes=("rotary_emb.inv_freq",), bridge=bridge, hf_aliases=hf_aliases,
    )


def _llama_biases(arch: ModelArch) -> dict:
    return {"attention_bias": arch.add_qkv_bias, "mlp_bias": arch.add_bias_linear}


def _every_layer_window(arch: ModelArch) -> bool:
    return is_llama_like(arch) and arch.window_layers is None


# Megatron-Bridge 0.4 and later write Llama as its generic GPTModelProvider; 0.1-0.3 wrote these subclasses.
_OLD_LLAMA_PROVIDERS = tuple(f"megatron.bridge.models.llama.llama_provider.{name}" for name in (
    "LlamaModelProvider", "Llama2ModelProvider7B", "Llama2ModelProvider13B", "Llama2ModelProvider70B",
    "Llama3ModelProvider", "Llama31ModelProvider", "Llama3ModelProvider8B", "Llama3ModelProvider70B",
    "Llama31ModelProvider8B", "Llama31ModelProvider70B", "Llama31ModelProvider405B", "Llama32ModelProvider1B",
    "Llama32ModelProvider3B", "CodeLlamaModelProvider7B", "CodeLlamaModelProvider13B", "CodeLlamaModelProvider34B",
    "CodeLlamaModelProvider70B"))
_MISTRAL_PROVIDER = "megatron.bridge.models.mistral.mistral_provider."

LLAMA = register(llama_like_family("llama", "LlamaConfig", "LlamaForCausalLM", config_extras=_llama_biases,
                                   bridge=BridgeProvider(writes=GPT_PROVIDER, reads=_OLD_LLAMA_PROVIDERS)))
MISTRAL = register(llama_like_family(
    "mistral", "MistralConfig", "MistralForCausalLM", config_extras=every_layer_window_kwargs,
    matches=_every_layer_window,
    bridge=BridgeProvider(writes=_MISTRAL_PROVIDER + "MistralModelProvider",
                          reads=(_MISTRAL_PROVIDER + "MistralSmall3ModelProvider24B",))))
