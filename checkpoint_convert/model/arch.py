"""The architecture description shared by every conversion: what both formats must agree on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LatentAttention:
    """Multi-latent attention (DeepSeek-V2 and V3), in megatron-core's names (``MLATransformerConfig``).

    Queries come from ``hidden`` through a low-rank ``q_lora_rank`` projection and its norm (None: one
    full projection); keys and values share one ``kv_lora_rank`` latent and its norm, projected up per
    head to ``qk_head_dim`` key rows (no rotary) and ``v_head_dim`` value rows. A rotary part of
    ``qk_pos_emb_head_dim`` is appended to each query head and one rotary key is shared by all heads.
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int

    @property
    def q_head_dim(self) -> int:
        return self.qk_head_dim + self.qk_pos_emb_head_dim


@dataclass(frozen=True)
class MambaSizes:
    """A Mamba-2 mixer, in megatron-core's names (``TransformerConfig.mamba_*``, ``MambaMixer``).

    ``num_heads`` heads of ``head_dim`` channels (``d_inner`` = their product) share ``num_groups`` groups of
    ``state_dim`` B and C rows; the causal depthwise convolution is ``conv_kernel`` wide. ``in_proj`` rows are
    [z, x, B, C, dt], the convolution's channels [x, B, C]: each part splits by its own unit across
    tensor-parallel ranks (:meth:`in_proj_parts`, :meth:`conv_parts`).
    """

    state_dim: int
    head_dim: int
    num_groups: int
    num_heads: int
    conv_kernel: int = 4

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    def in_proj_parts(self) -> tuple[int, ...]:
        groups = self.num_groups * self.state_dim
        return (self.d_inner, self.d_inner, groups, groups, self.num_heads)

    def conv_parts(self) -> tuple[int, ...]:
        groups = self.num_groups * self.state_dim
        return (self.d_inner, groups, groups)


# megatron-core's hybrid layer symbols (``mamba_hybrid_layer_allocation.Symbols``) -> what such a layer holds
LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "dense", "E": "moe"}


@dataclass
class ModelArch:
    """A decoder-only transformer, in Megatron's vocabulary.

    ``vocab_size`` is the true (unpadded) vocab. ``activation`` is one of ``gelu`` (exact),
    ``gelu_new`` (tanh approximation, Megatron's ``openai_gelu``), ``gelu_fast`` (Megatron's fused
    bias-gelu) or ``swiglu``. ``extra`` carries family-specific Hugging Face config values that
    have no Megatron field but must survive a round trip.

    ``qk_layernorm``: queries and keys pass through a norm of the architecture's ``normalization``
    over each head (``kv_channels`` wide) before rotary embedding. ``window_size``: sliding-window
    attention in Hugging Face's sense (a query sees itself and the ``window_size - 1`` tokens before
    it); ``window_layers`` then says which layers slide (1) and which attend fully (0), None for all.
    ``mla``: multi-latent attention replaces the fused qkv projection (``kv_channels`` is then the query
    and key head size, rotary part included).

    Mixture of experts (``num_experts`` set): ``moe_layers`` says which layers route to experts (1) and
    which have a dense MLP of ``ffn_hidden_size`` (0), None for all, as megatron-core's ``moe_layer_freq``
    list. The router scores experts with ``moe_router_score_function`` (``softmax`` or ``sigmoid``); with
    ``moe_router_pre_softmax`` the softmax runs over every expert before the top-k (the k weights are not
    renormalised), else over the k chosen logits (renormalised); ``moe_router_topk_scaling_factor``
    multiplies the k weights. Group-limited routing: the experts form ``moe_router_num_groups`` equal groups,
    and the k experts come from the ``moe_router_group_topk`` groups whose best k / group_topk scores sum
    highest. ``moe_router_enable_expert_bias`` (sigmoid only): a per-expert bias is added to the scores for
    choosing the k experts, not to their weights (sigmoid weights of k > 1 are always renormalised). Shared experts: one always-on MLP of ``moe_shared_expert_intermediate_size``
    beside the routed ones, its output scaled by sigmoid(gate . x) when ``moe_shared_expert_gate``.

    Attention sinks: ``softmax_type`` ``learnable`` gives each head a learned logit that joins every query's
    softmax and is then dropped (megatron-core's ``softmax_offset``); ``vanilla`` has none. Gated units:
    ``activation`` ``quick_geglu`` is ``x * sigmoid(1.702 x)`` on the gate half; ``activation_func_clamp_value``
    clamps the gate half from above and the linear half on both sides first, and ``glu_linear_offset`` is added
    to the linear half (megatron-core's ``glu``).
    """

    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    normalization: str = "LayerNorm"
    activation: str = "gelu"
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    rope_scaling: dict | None = None
    add_bias_linear: bool = True
    add_qkv_bias: bool = True
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_aux_loss_coeff: float = 0.0
    moe_layers: tuple[int, ...] | None = None
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_enable_expert_bias: bool = False
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    attention_dropout: float = 0.0  # training settings Megatron-LM takes from a checkpoint's args
    hidden_dropout: float = 0.0
    qk_layernorm: bool = False
    window_size: int | None = None
    window_layers: tuple[int, ...] | None = None
    mla: LatentAttention | None = None
    # attention sinks and clamped GLUs (gpt-oss), megatron-core's own fields: see the class docstring's last paragraph
    softmax_type: str = "vanilla"
    glu_linear_offset: float = 0.0
    activation_func_clamp_value: float | None = None
    params_dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)
    # multi-token prediction layers after the decoder (megatron-core's ``mtp_num_layers``; see ``mtp.py``)
    mtp_num_layers: int = 0
    # the fraction of each query and key head's rows rotary embeddings rotate (the first ones; megatron-core's
    # ``rotary_percent``, transformers' ``partial_rotary_factor``)
    rotary_percent: float = 1.0
    # hybrid models (megatron-core's MambaModel): ``layer_pattern`` holds one symbol per layer (``LAYER_KINDS``:
    # a Mamba-2 mixer, attention, a dense MLP or experts, each layer one of them behind its own norm); None: every
    # layer attention then an MLP. ``mamba``: the mixers' sizes. ``moe_latent_size``: experts work in a latent space
    # of that size, projected from and back to hidden (``mlp.fc1_latent_proj`` / ``fc2_latent_proj``).
    layer_pattern: str | None = None
    mamba: MambaSizes | None = None
    moe_latent_size: int | None = None
    # multimodal rotary embeddings (``position_embedding_type`` "mrope"): the rotary frequencies split into
    # temporal, height and width sections of these sizes (pairs), each rotated by its own position id
    mrope_section: tuple[int, ...] | None = None

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer`` (global index) routes to experts rather than running a dense MLP."""
        if self.layer_pattern is not None:
            return bool(self.num_experts) and self.layer_pattern[layer] == "E"
        return bool(self.num_experts) and (self.moe_layers is None or bool(self.moe_layers[layer]))

    def layer_parts(self, layer: int) -> frozenset[str]:
        """What ``layer`` holds (``LAYER_KINDS`` values): one part of a hybrid model's pattern, else attention and
        an MLP, experts or dense."""
        if self.layer_pattern is not None:
            return frozenset({LAYER_KINDS[self.layer_pattern[layer]]})
        return frozenset({"attention", "moe" if self.is_moe_layer(layer) else "dense"})

    def replace(self, **changes: Any) -> "ModelArch":
        return dataclasses.replace(self, **changes)
