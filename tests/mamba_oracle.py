"""megatron-core's hybrid model (``MambaModel``) on CPU, for ``tests/megatron_oracle.py``.

megatron-core 0.16.1's ``MambaMixer`` runs CUDA/Triton kernels of the ``mamba_ssm`` package (and wants
``einops``), none of which is installed here. With ``use_mamba_mem_eff_path=False`` (Megatron-LM's
``--disable-mamba-mem-eff-path``) the mixer takes its unfused path: its own ``nn.Conv1d`` for the causal
depthwise convolution (``causal_conv1d`` is absent, so megatron-core itself falls back to it), then
``mamba_chunk_scan_combined`` (the chunked SSD scan) and ``mamba_ssm``'s gated RMSNorm module. This module
gives exactly those two a torch body:

- :func:`ssd_reference`: the selective state space recurrence the chunked scan computes, step by step: for
  head h of group g, dt = softplus(dt + dt_bias), state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T,
  y_t = state_t C_t + D_h x_t (``tests/test_nemotron_h.py`` checks it against transformers' torch scan);
- :class:`GatedRMSNorm`: RMSNorm over groups of ``group_size`` channels of y * silu(z), times the weight
  (``norm_before_gate`` false, as ``MambaMixer`` asserts; checked against transformers' ``NemotronHRMSNormGated``);

and ``einops.rearrange`` a stand-in for the axis patterns the mixer uses (:func:`rearrange`: pure reshapes and
permutations); the Triton helpers of dynamic inference it imports are stubs that fail if called. ``MambaStack`` builds its final norm with Transformer Engine's ``TENorm``; without Transformer
Engine it is megatron-core's own torch norm (``WrappedTorchNorm``), as the local GPT spec uses. Everything else is
megatron-core's code, with the local (non-Transformer-Engine) layers the GPT oracle uses.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def ssd_reference(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                  dt_limit=(0.0, float("inf")), return_final_states=False, **unused):
    """``mamba_chunk_scan_combined``'s result, one time step after another (``z`` gating is the norm's here).

    x [b, l, h, p], dt [b, l, h], A [h], B and C [b, l, g, n], D [h] -> y [b, l, h, p] in x's dtype."""
    assert z is None and not return_final_states and not unused.get("seq_idx") and not unused.get("initial_states")
    heads, groups = x.shape[2], B.shape[2]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    B = B.float().repeat_interleave(heads // groups, dim=2)  # [b, l, h, n]
    C = C.float().repeat_interleave(heads // groups, dim=2)
    state = torch.zeros(x.shape[0], heads, x.shape[3], B.shape[3])  # [b, h, p, n]
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A.float())  # [b, h]
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t].float())[..., None] * B[:, t, :, None, :]
        y = (state * C[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + D.float()[:, None] * x[:, t].float()
        outputs.append(y)
    return torch.stack(outputs, dim=1).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """``mamba_ssm``'s gated RMSNorm (``norm_before_gate`` false) in torch: normalise y * silu(z) over each group."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False, device=None, dtype=None):
        super().__init__()
        assert not norm_before_gate
        self.eps, self.group_size = eps, group_size or hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, z=None):
        dtype = x.dtype
        x = x.float() * F.silu(z.float()) if z is not None else x.float()
        grouped = x.reshape(*x.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.reshape(x.shape) * self.weight.float()).to(dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As megatron-core's ``ExtendedRMSNorm`` shards it in torch_dist: the weight split along axis 0."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])


_AXES = re.compile(r"\(([^)]*)\)|(\S+)")


def _groups(side: str) -> list[list[str]]:
    return [match.group(1).split() if match.group(1) is not None else [match.group(2)]
            for match in _AXES.finditer(side)]


def rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """``einops.rearrange`` for patterns of named axes and parenthesised groups (no ellipsis, no literal axes)."""
    left, right = (_groups(side) for side in pattern.split("->"))
    known = dict(sizes)
    for group, size in zip(left, tensor.shape):
        unknown = [axis for axis in group if axis not in known]
        product = 1
        for axis in group:
            product *= known.get(axis, 1)
        if unknown:
            known[unknown[0]] = size // product
    elementary = [axis for group in left for axis in group]
    order = [axis for group in right for axis in group]
    flat = tensor.reshape([known[axis] for axis in elementary]).permute([elementary.index(axis) for axis in order])
    shape = []
    for group in right:
        product = 1
        for axis in group:
            product *= known[axis]
        shape.append(product)
    return flat.reshape(shape)


def _unused(*args, **kwargs):
    raise AssertionError("a dynamic-inference Triton kernel was called")


def _without_triton() -> None:
    """``mamba_mixer`` imports Triton tensor helpers of dynamic inference at module level (Triton is absent): the
    forward pass never calls them, so they are left as functions that fail if called."""
    import sys
    import types

    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    try:
        __import__(name)
    except ImportError:
        stub = types.ModuleType(name)
        stub.tensor_get_slice_after = stub.tensor_masked_update = stub.tensor_merge = _unused
        sys.modules[name] = stub


def install_cpu_mamba() -> None:
    """Give megatron-core's Mamba mixer and stack the torch bodies above (see the module docstring)."""
    _without_triton()
    from megatron.core.ssm import mamba_block, mamba_context_parallel, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mamba_context_parallel.HAVE_EINOPS = True
    mamba_context_parallel.repeat = _unused  # context parallelism only
    mamba_mixer.HAVE_MAMBA_SSM = mamba_mixer.HAVE_EINOPS = True
    mamba_mixer.rearrange = rearrange
    mamba_mixer.mamba_chunk_scan_combined = ssd_reference
    mamba_mixer.ExtendedRMSNorm = GatedRMSNorm
    mamba_mixer.causal_conv1d_fn = None  # megatron-core's own torch convolution
    mamba_block.TENorm = WrappedTorchNorm


def hybrid_stack_spec(num_experts: int | None):
    """megatron-core's ``mamba_stack_spec`` with local layers: ``norm`` before the mixer (Transformer Engine fuses it
    into ``in_proj``), local attention, MLP and expert layers with their own norms; in torch_dist the norms take
    Transformer Engine's names, as the local GPT spec maps them (``sharded_state_dict_keys_map``)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                             TransformerLayerSubmodules)

    mixer = ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                                                          out_proj=RowParallelLinear))
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                              core_attention=DotProductAttention,
                                                              linear_proj=RowParallelLinear))
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    moe = get_moe_module_spec(use_te=False, num_experts=num_experts or 1, moe_grouped_gemm=False)
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm, mixer=mixer, mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm, mlp=mlp, mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm, mlp=moe, mlp_bda=get_bias_dropout_add)),
    ))


def hybrid_config_fields(args) -> dict:
    """TransformerConfig's hybrid fields from Megatron-LM's args (``core_transformer_config_from_args`` copies
    the ``mamba_*`` ones); the unfused mixer path (see the module docstring)."""
    return dict(is_hybrid_model=True, mamba_state_dim=args.mamba_state_dim, mamba_head_dim=args.mamba_head_dim,
                mamba_num_groups=args.mamba_num_groups, mamba_num_heads=args.mamba_num_heads,
                use_mamba_mem_eff_path=False)


def build_hybrid_model(args, config, pre_process: bool, post_process: bool):
    """The ``MambaModel`` (or this pipeline rank's part of it) Megatron-LM's ``pretrain_mamba`` builds from ``args``."""
    from megatron.core.models.mamba import MambaModel

    install_cpu_mamba()
    return MambaModel(
        config, hybrid_stack_spec(config.num_moe_experts), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        hybrid_override_pattern=args.hybrid_override_pattern, parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    ).eval()
