"""The Mixtral family table: Llama's attention, embeddings and norms, plus a router and experts.

Megatron stores each expert as its own SwiGLU MLP (``mlp.experts.local_experts.J.linear_fc1`` with
[gate; up] rows, ``linear_fc2``), J local to the expert-parallel rank. transformers 5 stores a layer's
experts as fused 3-D tensors: ``mlp.experts.gate_up_proj`` [experts, 2*ffn, hidden] (gate rows, then
up rows: exactly Megatron's fc1 per expert) and ``mlp.experts.down_proj`` [experts, hidden, ffn]. So
every expert tensor maps one to one; the core stacks and places experts. Older checkpoints
(``block_sparse_moe.experts.E.w1/w2/w3``, ``block_sparse_moe.gate``) are read through aliases.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from checkpoint_convert.model import (BadInputError, BridgeProvider, FamilySpec, GPT_PROVIDER, Layers, ModelArch, Param,
                                      Style, every_layer_window_kwargs, norm_topk_prob, per_expert_aliases, register,
                                      transformers_attr)
from llama.family import ATTENTION, FIRST, LAST, arch_from_llama_config, config_kwargs, is_llama_like

ROUTER = (Param("mlp.router.weight", ("mlp.gate.weight",), Style.REPLICATED, layers=Layers.MOE),)
EXPERTS = (
    Param("mlp.experts.local_experts.{expert}.linear_fc1.weight", ("mlp.experts.gate_up_proj",),
          Style.GLU_COLUMN, experts=True, layers=Layers.MOE),
    Param("mlp.experts.local_experts.{expert}.linear_fc2.weight", ("mlp.experts.down_proj",),
          Style.ROW, experts=True, layers=Layers.MOE),
)
MOE = ROUTER + EXPERTS
EXTRA_KEYS = ("router_jitter_noise",)


def arch_from_hf_config(cfg: Any) -> ModelArch:
    arch = arch_from_llama_config(cfg, "mixtral", EXTRA_KEYS)
    return arch.replace(num_experts=cfg.num_local_experts, moe_router_topk=cfg.num_experts_per_tok,
                        moe_ffn_hidden_size=cfg.intermediate_size, moe_aux_loss_coeff=cfg.router_aux_loss_coef)


def hf_config_from_arch(arch: ModelArch) -> Any:
    if arch.add_bias_linear or arch.add_qkv_bias:
        raise BadInputError("Mixtral has no biases, but the source's linear layers are biased")
    if not norm_topk_prob(arch):
        raise BadInputError("the router does not renormalise its top-k weights (moe_router_pre_softmax), which "
                            "Mixtral always does")
    kwargs = {**config_kwargs(arch), **every_layer_window_kwargs(arch)}
    kwargs["intermediate_size"] = arch.moe_ffn_hidden_size or arch.ffn_hidden_size
    return transformers_attr("MixtralConfig")(architectures=["MixtralForCausalLM"], num_local_experts=arch.num_experts,
                         num_experts_per_tok=arch.moe_router_topk, router_aux_loss_coef=arch.moe_aux_loss_coeff,
                         **kwargs)


def matches_megatron(arch: ModelArch) -> bool:
    return (is_llama_like(arch, experts=True) and arch.window_layers is None and arch.moe_layers is None
            and arch.moe_shared_expert_intermediate_size is None)


_OLD_GATE = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.gate\.weight$")


def _first(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def old_layout_aliases(names: list[str]) -> dict[str, tuple[list[str], Callable]]:
    """Current names for the per-expert layout older transformers versions wrote."""
    aliases = per_expert_aliases(names, "block_sparse_moe.experts.", "w1", "w3", "w2")
    for name in names:
        match = _OLD_GATE.match(name)
        if match:
            aliases[match.group(1) + "mlp.gate.weight"] = ([name], _first)
    return aliases


MIXTRAL = register(FamilySpec(
    name="mixtral", hf_model_types=("mixtral",), hf_layer_prefix="model.layers.{layer}.",
    first_stage=FIRST, layer=ATTENTION + MOE, last_stage=LAST, hf_config_class="MixtralConfig",
    arch_from_hf_config=arch_from_hf_config, hf_config_from_arch=hf_config_from_arch,
    matches_megatron=matches_megatron, hf_ignored_suffixes=("rotary_emb.inv_freq",),
    hf_aliases=old_layout_aliases,
    # Megatron-Bridge (0.6) has no Mixtral bridge; its generic GPT provider builds MoE models like this one
    bridge=BridgeProvider(writes=GPT_PROVIDER),
))
