"""Megatron-Bridge's ``run_config.yaml``: the architecture of a Megatron-Bridge checkpoint, read and written as data.

Megatron-Bridge (NVIDIA's Hugging Face <-> Megatron converter, the training framework of NeMo's Megatron
recipes) saves torch_dist weights without Megatron-LM ``args``: its model is the ``model:`` section of
``run_config.yaml``, a Hydra-style mapping whose objects are ``_target_`` entries (the provider class,
e.g. ``GPTModelProvider``, a megatron-core ``TransformerConfig``; values such as
``torch.nn.functional.silu`` or ``torch.bfloat16``). Megatron-Bridge instantiates them. Here the file is
read with ``yaml.safe_load`` as plain data and nothing is imported or called: the provider must be one a
registered family declares (``FamilySpec.bridge``) and every other ``_target_`` must lie in Megatron's or
torch's namespaces, else the file is refused as one that needs code to be understood.

A provider's fields are ``TransformerConfig`` fields, most of them the Megatron-LM argument of the same
name: a provider is read as the ``args`` Namespace the rest of the tool understands
(:func:`args_from_run_config`) and written from one (:func:`run_config_for`). Checked against
Megatron-Bridge 0.6.2: ``models/gpt_provider.py``, ``models/conversion/model_bridge.py`` (CONFIG_MAPPING),
``models/llama/llama_bridge.py``, ``models/mistral/``, ``training/model_load_save.py``,
``training/checkpointing.py``, ``training/state.py``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from ..base.errors import BadInputError
from ..model.arch import ModelArch
from ..model.family import FamilySpec, layout_flags, registered
from .hf_io import copy_tokenizer
from .hybrid import hybrid_args_of_provider, hybrid_provider_fields, local_stack_spec
from .megatron_io import iteration_dir_name
from .sinks import DISK, DiskSink
from .torch_dist_layout import RUN_CONFIG_FILE, TOKENIZER_DIR, TRAIN_STATE_FILE, TRAIN_STATE_TRACKER

CONFIG_CONTAINER = "megatron.bridge.training.config.ConfigContainer"
# What the _target_ entries of a Megatron-Bridge training configuration name: Megatron's config classes,
# enums and layer specs, torch's activations, init functions and dtypes. Anything else (os.system, torch.load,
# a user's module) is not a plain Megatron-Bridge file.
CONFIG_NAMESPACES = ("megatron.bridge.", "megatron.core.", "megatron.training.", "torch.nn.functional.",
                     "transformers.models.",  # Hugging Face config classes (a vision-language model's vision_config)
                     "torch.nn.init.", "torch._C._nn.")
TORCH_DTYPES = frozenset(f"torch.{name}" for name, value in vars(torch).items() if isinstance(value, torch.dtype))
_LAYER_SPECS = "megatron.bridge.models.gpt_provider."

# Provider fields that carry the Megatron-LM argument of the same name and meaning.
SAME_AS_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "layernorm_epsilon",
    "normalization", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "rotary_base", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_token_dispatcher_type",
    "moe_grouped_gemm", "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "make_vocab_size_divisible_by", "seq_length", "vocab_size",
    "fp16", "bf16", "hidden_dropout", "attention_dropout", "window_size", "window_attn_skip_freq",
    "moe_layer_freq", "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_enable_expert_bias",
    "moe_router_num_groups", "moe_router_group_topk", "mtp_num_layers", "rotary_percent",
    "mrope_section",
    "softmax_type", "glu_linear_offset", "activation_func_clamp_value",  # refused unless a family claims them (NEUTRAL)
)
# MLATransformerConfig's multi-latent attention sizes, Megatron-LM's arguments of the same names
MLA_SIZES = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
# MLATransformerConfig's rope: its own rope_type ('rope' or 'yarn') and YaRN fields, not GPTModelProvider's yarn_*
# ones: Hugging Face yarn key -> field (model_bridge.MLA_ROPE_SCALING_MAPPING)
_MLA_YARN = (("factor", "rotary_scaling_factor"), ("original_max_position_embeddings", "original_max_position_embeddings"),
             ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("mscale", "mscale"),
             ("mscale_all_dim", "mscale_all_dim"))
# megatron-core's own layer specs: the per-layer block spec is the one that builds MLA and dense-then-expert layers
_BLOCK_SPEC = "megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_block_spec"
# Written when the args lack them: TransformerConfig's own defaults (dropout 0.1) are training choices.
_WRITE_DEFAULTS = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "qk_layernorm": False, "softmax_type": "vanilla",
                   "glu_linear_offset": 0.0}
# Without these, a provider class's own defaults would decide the architecture.
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "normalization", "activation_func",
            "gated_linear_unit", "position_embedding_type", "share_embeddings_and_output_weights", "add_bias_linear")
# Provider fields that change what the model computes without adding tensors, at the value that changes
# nothing. No family table converts another value (a family claims a field through FamilySpec.bridge.fields);
# features that add tensors (qk norms, shared experts, MTP layers) are refused by the tensors themselves.
NEUTRAL = {
    "rotary_interleaved": False,
    "apply_residual_connection_post_layernorm": False, "layernorm_zero_centered_gamma": False,
    "softmax_scale": None, "softmax_type": "vanilla", "glu_linear_offset": 0.0, "activation_func_clamp_value": None, "no_rope_freq": None,
    "multi_latent_attention": False, "experimental_attention_variant": None, "heterogeneous_block_specs": False,
    "use_mup": False, "attention_output_gate": False, "qk_l2_norm": False, "moe_router_topk_limited_devices": None,
}
# torch.nn.functional.gelu is the builtin torch._C._nn.gelu, the name Megatron-Bridge's YAML writer gives it
_ACTIVATION_FUNCS = {"torch.nn.functional.silu": "silu", "torch.nn.functional.gelu": "gelu",
                     "torch._C._nn.gelu": "gelu", "megatron.core.activations.fast_gelu": "fast_gelu",
                     "megatron.core.fusions.fused_bias_geglu.quick_gelu": "quick_gelu",
                     "megatron.core.activations.quick_gelu": "quick_gelu",
                     "megatron.core.activations.squared_relu": "squared_relu"}
# ModelArch.activation -> (activation_func, gated_linear_unit, bias_activation_fusion). megatron-core's MLP
# fuses a biased gelu as the tanh approximation (bias_gelu_impl), Megatron-LM's --bias-gelu-fusion.
_ACTIVATION_PROVIDER = {
    "swiglu": ("torch.nn.functional.silu", True, True), "gelu": ("torch.nn.functional.gelu", False, False),
    "gelu_fast": ("torch.nn.functional.gelu", False, True),
    "gelu_new": ("megatron.core.activations.fast_gelu", False, False),
    # Megatron-Bridge's GPTOSSProvider: megatron-core fuses the experts' biased, clamped quick GLU
    "quick_geglu": ("megatron.core.fusions.fused_bias_geglu.quick_gelu", True, True),
    "squared_relu": ("megatron.core.activations.squared_relu", False, False),  # hybrid models' MLPs
}
_DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}
# Hugging Face yarn rope parameters -> GPTModelProvider fields (model_bridge.YARN_ROPE_SCALING_MAPPING)
_YARN = (("factor", "yarn_rotary_scaling_factor"),
         ("original_max_position_embeddings", "yarn_original_max_position_embeddings"),
         ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("mscale", "yarn_mscale"),
         ("mscale_all_dim", "yarn_mscale_all_dim"), ("truncate", "yarn_correction_range_round_to_int"))
# megatron-core's Llama 3 rope scaling fixes all but the factor
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ---- reading ------------------------------------------------------------------------------------

def _targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted place, value) of every ``_target_`` in a YAML tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node["_target_"]
        for key, value in node.items():
            if key != "_target_":
                yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{where}[{index}]")


def provider_families() -> dict[str, list[FamilySpec]]:
    """Provider class -> the registered families that declare it."""
    found: dict[str, list[FamilySpec]] = {}
    for spec in registered().values():
        for name in spec.bridge.classes if spec.bridge else ():
            found.setdefault(name, []).append(spec)
    return found


def family_for_provider(provider: str) -> FamilySpec | None:
    """The family a provider class names: the only one declaring it (None for a class several share)."""
    families = provider_families().get(provider, [])
    return families[0] if len(families) == 1 else None


def _check_targets(config: dict[str, Any], file: Path) -> None:
    providers = provider_families()
    if not isinstance(config["model"].get("_target_"), str):
        raise BadInputError("'model' names no provider class (_target_)", file)
    for where, target in _targets(config):
        if where == "model" and target not in providers:
            raise BadInputError(f"model provider _target_ '{target}' is not one a family here declares "
                                f"({', '.join(sorted(providers))}); the file is not read", file)
        if not (isinstance(target, str) and (target.startswith(CONFIG_NAMESPACES) or target in TORCH_DTYPES)):
            raise BadInputError(f"'{where or 'top level'}' has _target_ '{target}', outside Megatron-Bridge's "
                                "configuration classes, torch's dtypes, activations and init functions: a file that "
                                "needs code to be understood is not read", file)


def read_run_config(file: Path) -> dict[str, Any]:
    """``run_config.yaml`` as plain data (``yaml.safe_load``: no Python objects), its ``_target_`` entries checked."""
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise BadInputError(f"unreadable YAML ({' '.join(str(error).split())[:160]})", file)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise BadInputError("no 'model:' mapping, where Megatron-Bridge describes the model", file)
    _check_targets(config, file)
    if config.get("peft"):
        raise BadInputError("a PEFT (adapter) checkpoint: its iteration holds adapter weights, not the model", file)
    return config


def _target_of(value: Any) -> Any:
    return value.get("_target_") if isinstance(value, dict) else value


def _local_spec(spec: Any) -> bool:
    """Whether a layer spec builds megatron-core's local (torch) modules: Megatron-Bridge's ``local_layer_spec``, or
    megatron-core's block spec as a partial with ``use_transformer_engine: false``."""
    if isinstance(spec, dict) and _target_of(spec) == _BLOCK_SPEC:
        return spec.get("use_transformer_engine") is False
    return str(_target_of(spec) or "").endswith(".local_layer_spec")


def _activation(model: dict[str, Any], file: Path) -> str:
    """ModelArch.activation of a provider: its activation function, gating and fused bias activation."""
    function = _target_of(model["activation_func"])
    gated = bool(model["gated_linear_unit"])
    fused_bias = bool(model.get("bias_activation_fusion")) and bool(model["add_bias_linear"])
    kind = _ACTIVATION_FUNCS.get(function)
    if gated and kind == "silu":
        return "swiglu"
    if gated and kind == "quick_gelu":
        return "quick_geglu"
    if not gated and kind == "gelu":
        return "gelu_fast" if fused_bias else "gelu"
    if not gated and kind == "fast_gelu":
        return "gelu_new"
    if not gated and kind == "squared_relu":
        return "squared_relu"
    raise BadInputError(f"model.activation_func {function} with gated_linear_unit={gated} has no conversion here", file)


def _dtype(model: dict[str, Any], file: Path) -> torch.dtype:
    target = _target_of(model.get("params_dtype"))
    if target is None:
        return torch.bfloat16 if model.get("bf16") else torch.float16 if model.get("fp16") else torch.float32
    if target not in _DTYPES:
        raise BadInputError(f"model.params_dtype {target} is not one of {', '.join(_DTYPES)}", file)
    return _DTYPES[target]


def _rope_args(model: dict[str, Any]) -> dict[str, Any]:
    """Position embedding args: Llama 3 scaling is Megatron-LM's use_rope_scaling; linear and yarn scaling are
    recorded as Hugging Face rope parameters (hf_rope_scaling), as this tool's own args record them."""
    kind, scaling = model["position_embedding_type"], None
    if kind == "yarn":
        kind = "rope"
        scaling = {"rope_type": "yarn", **{hf: model[field] for hf, field in _YARN if model.get(field) is not None}}
        if scaling.get("truncate") is True:  # Hugging Face's default, left unsaid as its configs do
            del scaling["truncate"]
    elif model.get("seq_len_interpolation_factor"):
        scaling = {"rope_type": "linear", "factor": float(model["seq_len_interpolation_factor"])}
    return {"position_embedding_type": kind, "use_rotary_position_embeddings": kind == "rope",
            "use_rope_scaling": bool(model.get("rope_scaling")),
            "rope_scaling_factor": float(model.get("rope_scaling_factor") or 1.0), "hf_rope_scaling": scaling}


def _yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention scale for a context ``factor`` (megatron-core's ``_yarn_get_mscale``, DeepSeek's own)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _mla_rope_args(model: dict[str, Any], file: Path) -> dict[str, Any]:
    """Position embedding args of an MLA provider: rotary rows always (position_embedding_type 'rope'), scaled by
    MLA's own YaRN fields when rope_type is 'yarn'. A YaRN factor of 1 changes nothing (frequencies and attention
    scale stay), which is how Megatron-Bridge records a DeepSeek model without rope scaling."""
    kind, factor = model.get("rope_type", "yarn"), float(model.get("rotary_scaling_factor") or 1.0)
    if model["position_embedding_type"] != "rope" or kind not in ("rope", "yarn"):
        raise BadInputError(f"model.position_embedding_type {model['position_embedding_type']} with rope_type {kind}: "
                            "multi-latent attention takes rotary rows ('rope') and rope_type 'rope' or 'yarn'", file)
    if kind == "rope" and _yarn_mscale(factor, float(model.get("mscale_all_dim") or 0.0)) != 1.0:
        raise BadInputError(f"model.rope_type is 'rope' but rotary_scaling_factor {factor} and mscale_all_dim "
                            f"{model.get('mscale_all_dim')} scale the attention: no Hugging Face model does that", file)
    scaling = None
    if kind == "yarn" and factor != 1.0:
        scaling = {"rope_type": "yarn", **{hf: model[field] for hf, field in _MLA_YARN if model.get(field) is not None}}
    return {"position_embedding_type": "rope", "use_rotary_position_embeddings": True, "use_rope_scaling": False,
            "rope_type": "yarn" if scaling else "rope", "hf_rope_scaling": scaling}


def _latent_attention_args(model: dict[str, Any], file: Path) -> dict[str, Any]:
    """Multi-latent attention args (Megatron-LM's names are the provider's); ``kv_channels`` is the query head, as
    this tool records it (Megatron-Bridge writes Hugging Face's ``head_dim``, which MLA does not read)."""
    if not model.get("multi_latent_attention"):
        return {"multi_latent_attention": False}
    sizes = {name: model.get(name) for name in MLA_SIZES}
    return {"multi_latent_attention": True, **sizes, **_mla_rope_args(model, file),
            "kv_channels": int(sizes["qk_head_dim"]) + int(sizes["qk_pos_emb_head_dim"])}


def _claimed_fields(provider: str) -> set[str]:
    """The fields the families declaring this provider class convert (any of them: the architecture then decides)."""
    return {name for spec in provider_families().get(provider, []) for name in spec.bridge.fields}


def _refuse_unconverted(model: dict[str, Any], file: Path) -> None:
    claimed = _claimed_fields(model["_target_"])
    for name, neutral in NEUTRAL.items():
        value = model.get(name, neutral)
        if name not in claimed and value != neutral:
            raise BadInputError(f"model.{name} is {value!r}; no model family here converts a model with it", file)


def args_from_run_config(config: dict[str, Any], file: Path) -> argparse.Namespace:
    """The Megatron-LM args a provider describes (architecture, dtype, the layout it was trained with)."""
    model = config["model"]
    missing = [name for name in REQUIRED if name not in model]
    if missing:
        raise BadInputError(f"model: lacks {', '.join(missing)}", file)
    family = family_for_provider(model["_target_"])
    _refuse_unconverted(model, file)
    heads = int(model["num_attention_heads"])
    groups = int(model.get("num_query_groups") or heads)
    activation = _activation(model, file)
    local = (_local_spec(model.get("transformer_layer_spec")) or local_stack_spec(model)
             or model.get("transformer_impl") == "local")
    fields = {name: model[name] for name in SAME_AS_ARGS if model.get(name) is not None}
    fields.update(
        num_query_groups=groups, group_query_attention=groups != heads, num_experts=model.get("num_moe_experts"),
        max_position_embeddings=model.get("seq_length", 1024), orig_vocab_size=model["vocab_size"],
        untie_embeddings_and_output_weights=not model["share_embeddings_and_output_weights"],
        swiglu=activation == "swiglu", quick_geglu=activation == "quick_geglu", bias_gelu_fusion=activation == "gelu_fast", openai_gelu=activation == "gelu_new",
        squared_relu=activation == "squared_relu",
        params_dtype=_dtype(model, file), transformer_impl="local" if local else "transformer_engine",
        ckpt_format="torch_dist", hf_family=family.name if family else None,
        hf_extra_config=family.bridge.from_provider(model) if family else {}, **_rope_args(model))
    fields.update(_latent_attention_args(model, file))
    fields.update(hybrid_args_of_provider(model, file))
    return argparse.Namespace(**fields)


def _tokenizer_args(config: dict[str, Any], iter_dir: Path) -> dict[str, Any]:
    """Megatron-LM's tokenizer args from the ``tokenizer:`` section (a TokenizerConfig: the same field names),
    the model being the copy Megatron-Bridge keeps in the iteration directory when there is one."""
    section = config.get("tokenizer") if isinstance(config.get("tokenizer"), dict) else {}
    copied = iter_dir / TOKENIZER_DIR
    fields = {"tokenizer_type": section.get("tokenizer_type"),
              "tokenizer_model": str(copied.resolve()) if copied.is_dir() else section.get("tokenizer_model")}
    return {name: value for name, value in fields.items() if isinstance(value, str)}


def read_bridge_args(file: Path) -> argparse.Namespace:
    """The args of a Megatron-Bridge iteration directory, from its ``run_config.yaml``."""
    config = read_run_config(file)
    args = args_from_run_config(config, file)
    vars(args).update(_tokenizer_args(config, file.parent))
    return args


# ---- writing ------------------------------------------------------------------------------------

def _callable(target: str) -> dict[str, Any]:
    """How Megatron-Bridge writes a function or dtype: a target it imports but does not call."""
    return {"_call_": False, "_target_": target}


def _rope_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Provider rope fields: Llama 3 scaling (factor only), linear interpolation, or yarn; nothing else maps."""
    scaling = dict(getattr(args, "hf_rope_scaling", None) or {})
    kind = scaling.get("rope_type", "default")
    if kind == "llama3" and any(float(scaling.get(key, value)) != value for key, value in _LLAMA3_FIXED.items()):
        raise BadInputError(f"Llama 3 rope scaling {scaling} differs from megatron-core's fixed low/high frequency "
                            "factors and original context, for which Megatron-Bridge has no field")
    if kind not in ("default", "llama3", "linear", "yarn"):
        raise BadInputError(f"rope scaling '{kind}' has no Megatron-Bridge provider field")
    fields = {"position_embedding_type": "yarn" if kind == "yarn" else args.position_embedding_type,
              "rotary_base": args.rotary_base, "rotary_percent": getattr(args, "rotary_percent", 1.0), "rope_scaling": kind == "llama3",
              "rope_scaling_factor": float(scaling["factor"]) if kind == "llama3" else 1.0,
              "seq_len_interpolation_factor": float(scaling["factor"]) if kind == "linear" else None}
    if kind == "yarn":
        fields.update({field: scaling[hf] for hf, field in _YARN if hf in scaling})
        # Hugging Face rounds the correction range unless told not to; providers differ in their default
        fields["yarn_correction_range_round_to_int"] = bool(scaling.get("truncate", True))
    return fields


def _latent_attention_fields(args: argparse.Namespace) -> dict[str, Any]:
    """MLAModelProvider's attention and rope fields, from the args of the same names: rotary rows scaled by MLA's
    own YaRN fields (rope_type), and no rope fusion (megatron-core allows it for MLA with YaRN only)."""
    rope = {field: getattr(args, field, None) for field in ("rope_type", *(field for _, field in _MLA_YARN))}
    return {"multi_latent_attention": True, **{name: getattr(args, name) for name in MLA_SIZES},
            **{field: value for field, value in rope.items() if value is not None},
            "position_embedding_type": "rope", "rotary_base": args.rotary_base, "rotary_percent": 1.0,
            "rope_scaling": False, "rope_scaling_factor": 1.0, "seq_len_interpolation_factor": None,
            "apply_rope_fusion": False}


def _provider_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The family-independent provider fields, from the args written beside them in ``common.pt``."""
    function, gated, fused_bias = _ACTIVATION_PROVIDER[_activation_of_args(args)]
    local = args.transformer_impl == "local"
    dtype = str(args.params_dtype)
    fields = {name: getattr(args, name, _WRITE_DEFAULTS.get(name)) for name in SAME_AS_ARGS}
    fields.update(
        seq_length=args.max_position_embeddings, num_query_groups=args.num_query_groups,
        num_moe_experts=args.num_experts,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        activation_func=_callable(function), gated_linear_unit=gated, bias_activation_fusion=fused_bias,
        params_dtype=_callable(dtype), pipeline_dtype=_callable(dtype), should_pad_vocab=False,
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        pipeline_model_parallel_layout=getattr(args, "pipeline_model_parallel_layout", None),
        context_parallel_size=1, sequence_parallel=False, transformer_impl=args.transformer_impl,
        transformer_layer_spec=_layer_spec(args),
        # fused kernels: Transformer Engine's (as Megatron-Bridge's Llama bridge enables them); the local
        # spec's torch norms refuse persist_layer_norm, and rope fusion needs Transformer Engine
        persist_layer_norm=not local, apply_rope_fusion=not local, bias_dropout_fusion=not local,
        masked_softmax_fusion=True, gradient_accumulation_fusion=False,
        mtp_num_layers=getattr(args, "mtp_num_layers", None) or None)
    fields.update(_latent_attention_fields(args) if getattr(args, "multi_latent_attention", False) else _rope_fields(args))
    return hybrid_provider_fields(fields, args)


def _layer_spec(args: argparse.Namespace) -> Any:
    """The provider's layer spec. Megatron-Bridge's ``default_layer_spec`` / ``local_layer_spec`` build one layer
    for every layer (experts in all when there are experts) and no MLA; megatron-core's block spec, written as the
    partial Megatron-Bridge's DeepSeek bridges write, builds each layer as ``moe_layer_freq`` and MLA say."""
    local = args.transformer_impl == "local"
    if getattr(args, "multi_latent_attention", False) or isinstance(getattr(args, "moe_layer_freq", 1), list):
        return {"_target_": _BLOCK_SPEC, "_partial_": True, "_args_": [], "use_transformer_engine": not local}
    return _callable(_LAYER_SPECS + ("local_layer_spec" if local else "default_layer_spec"))


def _activation_of_args(args: argparse.Namespace) -> str:
    if getattr(args, "squared_relu", False):
        return "squared_relu"
    if getattr(args, "quick_geglu", False):
        return "quick_geglu"
    if args.swiglu:
        return "swiglu"
    return "gelu_fast" if args.bias_gelu_fusion else "gelu_new" if args.openai_gelu else "gelu"


def bridge_vocab_divisor(vocab_size: int) -> int:
    """Megatron-Bridge's make_vocab_size_divisible_by: the largest power of two up to 128 dividing the vocab
    (``MegatronModelBridge.make_vocab_size_divisible_by``); its checkpoints keep the vocab unpadded."""
    divisor = 128
    while vocab_size % divisor:
        divisor //= 2
    return divisor


def run_config_for(args: argparse.Namespace, arch: ModelArch, family: FamilySpec, save_path: Path,
                   tokenizer: bool) -> dict[str, Any]:
    """The ``run_config.yaml`` Megatron-Bridge's ``save_megatron_model`` writes for this model (the sections it
    sets; Megatron-Bridge reads ``model`` to build the model, ``tokenizer`` for the tokenizer and
    ``checkpoint`` to resume training)."""
    if family.bridge is None:
        reason = (family.bridge_missing
                  or f"the {family.name} family declares no Megatron-Bridge provider (FamilySpec.bridge)")
        other = f"; write {layout_flags(family)} instead" if family.mindspeed_mm else ""
        raise BadInputError(f"{reason}, so no Megatron-Bridge checkpoint is written for it{other}")
    model = {"_target_": family.bridge.writes, **_provider_fields(args), **family.bridge.to_provider(arch)}
    checkpoint = {"_target_": "megatron.bridge.training.config.CheckpointConfig", "ckpt_format": "torch_dist",
                  "save": str(save_path), "save_optim": False, "save_rng": False, "async_save": False,
                  "fully_parallel_save": True, "dist_ckpt_optim_fully_reshardable": True}
    tokenizer_config = {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                        "tokenizer_type": "HuggingFaceTokenizer", "hf_tokenizer_kwargs": {},
                        "tokenizer_model": str(save_path / iteration_dir_name(0) / TOKENIZER_DIR)}
    return {"_target_": CONFIG_CONTAINER, "model": model, "checkpoint": checkpoint,
            "tokenizer": tokenizer_config if tokenizer else None,
            "optimizer": {"_target_": "megatron.core.optimizer.optimizer_config.OptimizerConfig",
                          "use_distributed_optimizer": False},
            "logger": {"_target_": "megatron.bridge.training.config.LoggerConfig"},
            "train": None, "ddp": None, "scheduler": None, "dataset": None, "dist": None}


def train_state(step: int = 0) -> dict[str, torch.Tensor]:
    """Megatron-Bridge's ``TrainState.state_dict()`` (training/state.py) of a checkpoint nothing has trained,
    with FLOPs as float32, as its checkpoint finalizer saves them."""
    zero = torch.tensor(0, dtype=torch.int64)
    return {"step": torch.tensor(step, dtype=torch.int64), "consumed_train_samples": zero.clone(),
            "skipped_train_samples": zero.clone(), "consumed_valid_samples": zero.clone(),
            "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float32),
            "do_train": torch.tensor(False), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}


def write_bridge_files(root: Path, run_config: dict[str, Any], tokenizer_dir: Path | None, iter_dir: Path,
                       sink: DiskSink = DISK) -> None:
    """Everything beside the torch_dist data that Megatron-Bridge reads: run_config.yaml, the train state in the
    iteration directory and as its tracker beside it, and the tokenizer (its ``save_tokenizer_assets``)."""
    sink.write_text(iter_dir / RUN_CONFIG_FILE, yaml.safe_dump(run_config, sort_keys=True))
    sink.torch_save(train_state(), iter_dir / TRAIN_STATE_FILE)
    sink.torch_save(train_state(), root / TRAIN_STATE_TRACKER)
    if tokenizer_dir is not None:
        copy_tokenizer(str(tokenizer_dir), iter_dir / TOKENIZER_DIR, sink)
