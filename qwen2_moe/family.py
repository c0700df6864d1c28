"""The Qwen2-MoE family table (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention, Mixtral's router and
experts, and a shared expert behind a sigmoid gate.

An expert layer's router ``mlp.gate.weight`` and routed experts map as Mixtral's (transformers 5's fused
3-D ``mlp.experts.gate_up_proj`` / ``down_proj``; the per-expert ``mlp.experts.E.{gate,up,down}_proj`` of
older versions are read through aliases). Beside them a shared expert, a SwiGLU MLP every token passes
through (``mlp.shared_expert.{gate,up,down}_proj``, ``shared_expert_intermediate_size``), is megatron-core's
``mlp.shared_experts.linear_fc1`` ([gate; up]) / ``linear_fc2`` (``moe_shared_expert_intermediate_size``);
its output is scaled by sigmoid(``mlp.shared_expert_gate.weight`` [1, hidden] . x), megatron-core's
``mlp.shared_experts.gate_weight`` (``moe_shared_expert_gate``).

Layers in ``mlp_only_layers``, or whose index + 1 is not a multiple of ``decoder_sparse_step``, have a
dense MLP of ``intermediate_size`` instead: megatron-core's ``moe_layer_freq`` list. The router takes a
softmax over every expert then the top-k, divided by their sum with ``norm_topk_prob``: megatron-core's
``moe_router_pre_softmax`` = not norm_topk_prob. ``qkv_bias`` biases q, k and v (never o_proj). The legacy
Megatron model has no shared experts: the core refuses ``--megatron_format legacy``.
"""
from __future__ import annotations

from typing import Any

from checkpoint_convert.model import (BadInputError, BridgeProvider, GPT_PROVIDER, Layers, ModelArch, Param, Style,
                                      gate_up_to_hf, gate_up_to_megatron, moe_layers_from_hf_config, norm_topk_prob,
                                      per_expert_aliases, per_layer_window_kwargs, register, softmax_routing,
                                      sparse_step_kwargs)
from llama.family import DENSE_MLP, PRE_MLP_NORM, SELF_ATTENTION, is_llama_like, llama_like_family
from mixtral.family import MOE


def _shared(arch: ModelArch) -> bool:
    return arch.moe_shared_expert_intermediate_size is not None


def _gated(arch: ModelArch) -> bool:
    return arch.moe_shared_expert_gate


def shared_expert(hf_prefix: str) -> tuple[Param, ...]:
    """An expert layer's shared expert, a SwiGLU MLP named ``{hf_prefix}{gate,up,down}_proj``, and its sigmoid
    gate ``{hf_prefix}gate.weight`` [1, hidden] when the architecture gates it (Qwen2-MoE names the gate
    ``shared_expert_gate``: ``hf_prefix`` 'mlp.shared_expert.' gives 'mlp.shared_expert_gate.weight')."""
    return (
        Param("mlp.shared_experts.linear_fc1.weight", (f"{hf_prefix}gate_proj.weight", f"{hf_prefix}up_proj.weight"),
              Style.GLU_COLUMN, gate_up_to_hf, gate_up_to_megatron, when=_shared, layers=Layers.MOE),
        Param("mlp.shared_experts.linear_fc2.weight", (f"{hf_prefix}down_proj.weight",), Style.ROW, when=_shared,
              layers=Layers.MOE),
        Param("mlp.shared_experts.gate_weight", (f"{hf_prefix.rstrip('.')}_gate.weight",), Style.REPLICATED,
              when=_gated, layers=Layers.MOE),
    )


LAYER = SELF_ATTENTION + PRE_MLP_NORM + DENSE_MLP + MOE + shared_expert("mlp.shared_expert.")
# recorded so that a round trip writes the source's own spelling of the expert layers (sparse_step_kwargs)
SPARSE_KEYS = ("decoder_sparse_step", "mlp_only_layers")


def routed_experts(cfg: Any) -> dict[str, Any]:
    """The architecture fields of transformers' Qwen-style mixture-of-experts config keys (Qwen2-MoE, Qwen3-MoE)."""
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts  # Qwen3-MoE writes num_local_experts
    if not experts:
        raise BadInputError("num_experts is 0: a dense model, which the dense family of the same attention converts")
    return dict(num_experts=experts, moe_router_topk=cfg.num_experts_per_tok,
                moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_aux_loss_coeff=cfg.router_aux_loss_coef,
                moe_layers=moe_layers_from_hf_config(cfg, cfg.num_hidden_layers), **softmax_routing(cfg.norm_topk_prob))


def routed_experts_kwargs(arch: ModelArch) -> dict[str, Any]:
    """Inverse of :func:`routed_experts`: the config keyword arguments."""
    return dict(num_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk,
                moe_intermediate_size=arch.moe_ffn_hidden_size or arch.ffn_hidden_size,
                router_aux_loss_coef=arch.moe_aux_loss_coeff, norm_topk_prob=norm_topk_prob(arch),
                **sparse_step_kwargs(arch))


def _arch_extras(cfg: Any) -> dict[str, Any]:
    return dict(routed_experts(cfg), add_qkv_bias=bool(getattr(cfg, "qkv_bias", True)),
                moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, moe_shared_expert_gate=True)


def _config_extras(arch: ModelArch) -> dict[str, Any]:
    # layer_types says which layers slide; max_window_layers (Qwen2-MoE derives other layers from it than
    # Qwen2) is kept as the source recorded it
    windows = {key: value for key, value in per_layer_window_kwargs(arch).items() if key != "max_window_layers"}
    return dict(routed_experts_kwargs(arch), qkv_bias=arch.add_qkv_bias, **windows,
                shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size)


def matches_megatron(arch: ModelArch) -> bool:
    return is_llama_like(arch, experts=True) and arch.moe_shared_expert_gate and not arch.add_bias_linear


def old_layout_aliases(names: list[str]) -> dict:
    """The per-expert ``mlp.experts.E.{gate,up,down}_proj`` of transformers 4."""
    return per_expert_aliases(names, "mlp.experts.", "gate_proj", "up_proj", "down_proj")


QWEN2_MOE = register(llama_like_family(
    "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", extra_keys=("max_window_layers", *SPARSE_KEYS),
    config_extras=_config_extras, layer=LAYER, fixed={"add_bias_linear": False}, matches=matches_megatron,
    # Megatron-Bridge (0.6) has no Qwen2-MoE bridge; its generic GPT provider builds the model
    bridge=BridgeProvider(writes=GPT_PROVIDER), arch_extras=_arch_extras, hf_aliases=old_layout_aliases))
