"""The gpt-oss family table (OpenAI's gpt-oss-20b and gpt-oss-120b): attention sinks, biased clamped-GLU experts.

What differs from Llama / Mixtral, and megatron-core's name for it:
- each attention head has a learned sink logit that joins its softmax and is dropped (``self_attn.sinks``
  [heads] -> ``self_attention.core_attention.softmax_offset``, ``softmax_type learnable``; split by head under
  tensor parallelism, as the heads are);
- q, k, v and o_proj are biased (``add_bias_linear``, which also biases the router and the experts);
- sliding windows on every other layer (``layer_types``; ``window_size`` (W - 1, 0) and a
  ``window_attn_skip_freq`` list), YaRN rotary scaling (``position_embedding_type yarn``);
- the router is biased (``mlp.router.bias``) and takes a softmax over its top-k logits (renormalised);
- experts store ``gate_up_proj`` [experts, hidden, 2 x ffn] to multiply from the left, gate and up in
  INTERLEAVED columns (even: gate, odd: up), where megatron-core's ``linear_fc1`` [2 x ffn, hidden] holds
  [gate; up] rows; ``down_proj`` [experts, ffn, hidden] is ``linear_fc2`` transposed (square in the real models,
  so only the logits tell the orientation); every expert projection has a bias;
- the unit is ``(clamp(up, -L, L) + 1) * g * sigmoid(1.702 g)`` with ``g = min(gate, L)``: megatron-core's
  ``quick_geglu`` (its ``quick_gelu`` fixes the 1.702 of ``swiglu_alpha``), ``glu_linear_offset`` 1 and
  ``activation_func_clamp_value`` L (``swiglu_limit``).
The released checkpoints store the experts in MXFP4, which the core dequantizes on read (``mxfp4``).
"""
from __future__ import annotations

from typing import Any

import torch

from checkpoint_convert.model import (BadInputError, BridgeProvider, FULL, FamilySpec, Layers, ModelArch, Param,
                                      SLIDING, Style, norm_topk_prob, register, softmax_routing, transformers_attr)
from llama.family import FIRST, LAST, OUT_BIAS, PRE_MLP_NORM, SELF_ATTENTION
from llama.hf_config import arch_from_llama_config, config_kwargs

MOE = Layers.MOE
_PROVIDER = "megatron.bridge.models.gpt_oss.gpt_oss_provider."
QUICK_GELU_ALPHA = 1.702  # megatron-core's activations.quick_gelu: x * sigmoid(1.702 * x)


def _interleaved_to_rows(tensor: torch.Tensor, transpose: bool) -> torch.Tensor:
    """[..., 2f] with gate in even and up in odd columns -> [gate; up] along the last axis, or (``transpose``) rows
    of the last two axes swapped: fc1 [experts, 2f, hidden]. One allocation, the result."""
    gate, up = tensor[..., 0::2], tensor[..., 1::2]
    if transpose:
        gate, up = gate.transpose(-1, -2), up.transpose(-1, -2)
    half = gate.shape[-2] if transpose else gate.shape[-1]
    shape = (*gate.shape[:-2], 2 * half, gate.shape[-1]) if transpose else (*gate.shape[:-1], 2 * half)
    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)  # meta when the core checks shapes
    axis = -2 if transpose else -1
    out.narrow(axis, 0, half).copy_(gate)
    out.narrow(axis, half, half).copy_(up)
    return out


def _rows_to_interleaved(tensor: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Inverse of :func:`_interleaved_to_rows`."""
    axis = -2 if transpose else -1
    gate, up = torch.chunk(tensor, 2, dim=axis)
    if transpose:
        gate, up = gate.transpose(-1, -2), up.transpose(-1, -2)
    out = torch.empty((*gate.shape[:-1], 2 * gate.shape[-1]), dtype=tensor.dtype, device=tensor.device)
    out[..., 0::2] = gate
    out[..., 1::2] = up
    return out


def fc1_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """``gate_up_proj`` [experts, hidden, 2f] (interleaved columns) -> ``linear_fc1`` [experts, 2f, hidden]
    ([gate; up] rows).

    A stored tensor is contiguous as Hugging Face lays it out; its transpose is contiguous only when a reader made
    it for this read (an MXFP4 source's dequantized experts: ``checkpoint_convert.mxfp4``). Then its rows are
    regrouped in place, one expert at a time, and no second copy of the largest expert tensor is made."""
    rows = tensors[0].transpose(-1, -2)
    if not rows.is_contiguous() or rows.device.type == "meta":
        return _interleaved_to_rows(tensors[0], transpose=True)
    half = rows.shape[-2] // 2
    for expert in rows.reshape(-1, *rows.shape[-2:]):
        interleaved = expert.clone()
        expert[:half] = interleaved[0::2]
        expert[half:] = interleaved[1::2]
    return rows


def fc1_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [_rows_to_interleaved(tensor, transpose=True)]


def fc1_bias_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    return _interleaved_to_rows(tensors[0], transpose=False)


def fc1_bias_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [_rows_to_interleaved(tensor, transpose=False)]


def transposed_to_megatron(tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    return tensors[0].transpose(-1, -2).contiguous()


def transposed_to_hf(tensor: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    return [tensor.transpose(-1, -2).contiguous()]


SINKS = (Param("self_attention.core_attention.softmax_offset", ("self_attn.sinks",), Style.COLUMN),)
ROUTER = (Param("mlp.router.weight", ("mlp.router.weight",), Style.REPLICATED, layers=MOE),
          Param("mlp.router.bias", ("mlp.router.bias",), Style.REPLICATED, layers=MOE))
_EXPERT = "mlp.experts.local_experts.{expert}."
EXPERTS = (
    Param(_EXPERT + "linear_fc1.weight", ("mlp.experts.gate_up_proj",), Style.GLU_COLUMN, fc1_to_hf, fc1_to_megatron,
          experts=True, layers=MOE),
    Param(_EXPERT + "linear_fc1.bias", ("mlp.experts.gate_up_proj_bias",), Style.GLU_COLUMN, fc1_bias_to_hf,
          fc1_bias_to_megatron, experts=True, layers=MOE),
    Param(_EXPERT + "linear_fc2.weight", ("mlp.experts.down_proj",), Style.ROW, transposed_to_hf,
          transposed_to_megatron, experts=True, layers=MOE),
    Param(_EXPERT + "linear_fc2.bias", ("mlp.experts.down_proj_bias",), Style.REPLICATED, experts=True, layers=MOE),
)


def arch_from_hf_config(cfg: Any) -> ModelArch:
    if not cfg.attention_bias:
        raise BadInputError("attention_bias is false: Megatron biases attention exactly when it biases the experts "
                            "(add_bias_linear), and gpt-oss experts are always biased")
    if float(cfg.swiglu_alpha) != QUICK_GELU_ALPHA:
        raise BadInputError(f"swiglu_alpha is {cfg.swiglu_alpha}: megatron-core's quick_gelu fixes it at 1.702")
    arch = arch_from_llama_config(cfg, "gpt_oss", ())
    return arch.replace(
        num_experts=cfg.num_local_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.intermediate_size, moe_aux_loss_coeff=cfg.router_aux_loss_coef,
        add_bias_linear=True, add_qkv_bias=True, activation="quick_geglu", glu_linear_offset=1.0,
        activation_func_clamp_value=float(cfg.swiglu_limit), softmax_type="learnable", **softmax_routing(True))


def _refuse_other_units(arch: ModelArch) -> None:
    """What gpt-oss computes and a Megatron source might not: sinks, the clamped, offset quick GLU, biases."""
    problems = [text for text, wrong in (
        (f"softmax_type {arch.softmax_type} (gpt-oss attention has sinks: 'learnable')",
         arch.softmax_type != "learnable"),
        (f"activation {arch.activation} (gpt-oss: quick_geglu)", arch.activation != "quick_geglu"),
        (f"glu_linear_offset {arch.glu_linear_offset} (gpt-oss: 1)", arch.glu_linear_offset != 1.0),
        ("no activation_func_clamp_value (gpt-oss clamps)", arch.activation_func_clamp_value is None),
        ("unbiased linear layers (gpt-oss biases all)", not arch.add_bias_linear)) if wrong]
    if problems:
        raise BadInputError(f"a gpt-oss model cannot express {'; '.join(problems)}")


def hf_config_from_arch(arch: ModelArch) -> Any:
    _refuse_other_units(arch)
    if not norm_topk_prob(arch):
        raise BadInputError("the router does not renormalise its top-k weights (moe_router_pre_softmax), which "
                            "gpt-oss always does")
    pattern = arch.window_layers or (1,) * arch.num_layers
    if arch.window_size is None:
        pattern = (0,) * arch.num_layers
    kwargs = config_kwargs(arch)
    kwargs.update(intermediate_size=arch.moe_ffn_hidden_size or arch.ffn_hidden_size, attention_bias=True,
                  sliding_window=arch.window_size if arch.window_size is not None else arch.extra.get("sliding_window"),
                  layer_types=[SLIDING if slides else FULL for slides in pattern])
    return transformers_attr("GptOssConfig")(
        architectures=["GptOssForCausalLM"], num_local_experts=arch.num_experts,
        num_experts_per_tok=arch.moe_router_topk,
        router_aux_loss_coef=arch.moe_aux_loss_coeff, swiglu_limit=arch.activation_func_clamp_value,
        swiglu_alpha=QUICK_GELU_ALPHA, **kwargs)


def matches_megatron(arch: ModelArch) -> bool:
    return (arch.normalization == "RMSNorm" and arch.activation == "quick_geglu" and bool(arch.num_experts)
            and arch.position_embedding_type == "rope" and arch.mla is None and arch.moe_layers is None
            and arch.moe_shared_expert_intermediate_size is None and not arch.qk_layernorm)


GPT_OSS = register(FamilySpec(
    name="gpt_oss", hf_model_types=("gpt_oss",), hf_layer_prefix="model.layers.{layer}.",
    first_stage=FIRST, layer=SELF_ATTENTION + OUT_BIAS + SINKS + PRE_MLP_NORM + ROUTER + EXPERTS, last_stage=LAST,
    hf_config_class="GptOssConfig", arch_from_hf_config=arch_from_hf_config, hf_config_from_arch=hf_config_from_arch,
    matches_megatron=matches_megatron, hf_ignored_suffixes=("rotary_emb.inv_freq",),
    # Megatron-Bridge's gpt-oss bridge writes GPTOSSProvider (20B / 120B: its sizes as defaults)
    bridge=BridgeProvider(writes=_PROVIDER + "GPTOSSProvider", reads=(_PROVIDER + "GPTOSSProvider20B",
                                                                     _PROVIDER + "GPTOSSProvider120B"),
                          fields=("softmax_type", "glu_linear_offset", "activation_func_clamp_value")),
))
