"""The real consumer: megatron-core's GPTModel on CPU, in its own process.

``python tests/megatron_oracle.py logits CKPT TOKENS OUT [TP EP]`` runs TP x PP x EP gloo processes (PP
and virtual PP from the checkpoint's args); each loads its own ``mp_rank_TT[_PPP][_EEE]`` rank file into
GPTModel chunks built from those args, as Megatron-LM builds them (pipeline stage placement, uneven
stages, layout string), with ``load_state_dict(strict=True)``; hidden states pass between pipeline
stages with gloo send/recv, and the last stage's gathered logits are saved. ``python tests/megatron_oracle.py make SPEC OUT TOKENS`` builds a random GPTModel
from a JSON spec of Megatron args, saves its own ``state_dict()`` as an mp_rank tree with the args
Megatron would store, and saves its logits; ``dist-make SPEC OUT TOKENS [TP]`` does the same through
megatron-core's ``dist_checkpointing.save`` (a torch_dist checkpoint) from TP ranks, and ``dist-logits CKPT TOKENS OUT [TP]`` loads a
torch_dist checkpoint with ``dist_checkpointing.load`` into a GPTModel at TP ranks (``[TP]``) and saves its logits.
``batch JOBS.json WORLD`` runs a list of such jobs in one set of WORLD processes (see ``batch_command``).

It runs in a separate process because the CPU workarounds below patch torch process-wide.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gpt2.reference_writer import random_weight, randomize  # noqa: E402
from tests.mamba_oracle import build_hybrid_model, hybrid_config_fields  # noqa: E402


def _free_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))


def _init_cpu_megatron(rank: int = 0, tp: int = 1, ep: int = 1, pp: int = 1, vpp: int | None = None,
                       world: int | None = None) -> None:
    """A gloo world (``tp * ep * pp`` ranks unless ``world`` says more: data-parallel replicas) with its
    model-parallel groups, and the CPU workarounds megatron-core needs without CUDA.

    - rotary embeddings, attention buffers and the MoE router call ``torch.cuda.current_device()``
      during forward: answer "cpu" so the tensors they create land on the CPU;
    - the local attention's dropout runs under the model-parallel RNG tracker, which must exist
      (``model_parallel_cuda_manual_seed`` is CUDA-only): the inference tracker needs no CUDA RNG;
    - 0.16.1's MoE router gating (``moe_utils``) references ``te_general_gemm``, undefined without
      Transformer Engine;
    - with pipeline stages, tied output weights are all-reduced between the first and last stage
      after ``.cuda()``: keep them on the CPU;
    - the sliding-window attention mask is built on device "cuda": build the same mask on the CPU;
    - without Transformer Engine, 0.16.1's ``megatron.core.extensions.transformer_engine`` imports with mock
      classes, so ``multi_latent_attention`` believes it has TE and calls ``isinstance(linear_proj, TELinear)``
      with a mock: tell it there is none (its ``HAVE_TE`` only guards that FP8 check).
    """
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None  # dist_checkpointing.save waits for CUDA copies
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world or tp * ep * pp)
    _init_parallel(tp, ep, pp, vpp)
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # the router's gating linear checks it before using torch
    from megatron.core.fusions import fused_softmax
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_mask
    from megatron.core.transformer import multi_latent_attention
    multi_latent_attention.HAVE_TE = False


def _init_parallel(tp: int = 1, ep: int = 1, pp: int = 1, vpp: int | None = None) -> None:
    """megatron-core's tensor, pipeline and expert parallel groups (and the RNG tracker) in the current world."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp,
                                             expert_model_parallel_size=ep)
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _save(tensor: torch.Tensor, out: Path) -> None:
    """Save atomically: data-parallel replicas may write the same result at once."""
    partial = out.with_name(f".{out.name}.{torch.distributed.get_rank()}")
    torch.save(tensor, partial)
    os.replace(partial, out)


def _cpu_sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron-core's sliding-window mask (True = masked) on the CPU: query i (at key position
    i + skv - sq) sees keys from ``left`` positions before it to ``right`` after it."""
    left, right = window_size
    query_at = torch.arange(sq).unsqueeze(1) + (skv - sq)
    keys = torch.arange(skv).unsqueeze(0)
    return (keys < query_at - left) | (keys > query_at + right)


def _activation(args):
    if getattr(args, "quick_geglu", False):  # Megatron-LM's --quick-geglu: megatron-core's quick_gelu, gated
        from megatron.core.activations import quick_gelu
        return quick_gelu
    if getattr(args, "swiglu", False):
        return F.silu
    if getattr(args, "squared_relu", False):
        from megatron.core.activations import squared_relu
        return squared_relu
    if getattr(args, "openai_gelu", False) or getattr(args, "bias_gelu_fusion", False):
        return lambda x: F.gelu(x, approximate="tanh")  # HF gelu_new / gelu_fast
    return F.gelu


def _pipeline_fields(args) -> dict:
    """TransformerConfig's pipeline fields from the args Megatron-LM stores, mapped as Megatron-LM's
    ``core_transformer_config_from_args`` does; none when this process group runs one stage."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return {}
    return dict(pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
                num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
                num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
                pipeline_model_parallel_layout=getattr(args, "pipeline_model_parallel_layout", None))


def _latent_attention_fields(args) -> dict:
    """MLATransformerConfig's multi-latent attention and YaRN fields from Megatron-LM's args (HEAD spells the
    YaRN range fields with a ``yarn_`` prefix), as Megatron-LM's ``core_transformer_config_from_args`` maps them."""
    if not getattr(args, "multi_latent_attention", False):
        return {}
    def first(*names, default=None):
        return next((getattr(args, name) for name in names if getattr(args, name, None) is not None), default)
    return dict(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim,
                qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim,
                rope_type=first("rope_type", default="yarn"), rotary_base=args.rotary_base,
                rotary_scaling_factor=first("rotary_scaling_factor", default=1.0), mscale=first("mscale", default=1.0),
                mscale_all_dim=first("mscale_all_dim", default=0.0),
                original_max_position_embeddings=first("yarn_original_max_position_embeddings",
                                                       "original_max_position_embeddings", default=4096),
                beta_fast=first("yarn_beta_fast", "beta_fast", default=32.0),
                beta_slow=first("yarn_beta_slow", "beta_slow", default=1.0))


def _mla_core_attention():
    """megatron-core 0.16.1's local ``DotProductAttention``, taking the ``k_channels``/``v_channels`` that
    ``MultiLatentAttention`` passes to its core attention (only Transformer Engine's ``TEDotProductAttention``
    accepts them, and it needs CUDA): its math already takes a key head size from the tensors, and its
    output width is ``kv_channels`` x heads, so the config's ``kv_channels`` is the value head size."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LatentDotProductAttention(DotProductAttention):
        def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs):
            assert v_channels in (None, config.kv_channels), (v_channels, config.kv_channels)  # None: Attention's own
            super().__init__(config, *args, **kwargs)

    return LatentDotProductAttention


def _gated(args) -> bool:
    """Megatron-LM's ``--swiglu`` and ``--quick-geglu`` make the MLP gated (there is no flag of its own)."""
    return bool(getattr(args, "swiglu", False) or getattr(args, "quick_geglu", False))


def _sink_and_glu_fields(args) -> dict:
    """Attention sinks (``softmax_type``) and the clamped, offset gated unit: TransformerConfig's fields of the
    args' names (Megatron-LM's ``core_transformer_config_from_args`` copies them)."""
    return {name: getattr(args, name) for name in ("softmax_type", "glu_linear_offset", "activation_func_clamp_value")
            if getattr(args, name, None) is not None}


def _set_yarn_fields(config, args) -> None:
    """A GPT model's YaRN (``position_embedding_type yarn``): 0.16.1's GPTModel and attention read ``yarn_*``
    attributes of the config that its TransformerConfig does not declare; set them from the args, as
    Megatron-Bridge's providers declare them."""
    if args.position_embedding_type != "yarn":
        return
    for field, name in (("yarn_rotary_scaling_factor", "rotary_scaling_factor"), ("yarn_mscale", "mscale"),
                        ("yarn_original_max_position_embeddings", "yarn_original_max_position_embeddings"),
                        ("yarn_beta_fast", "yarn_beta_fast"), ("yarn_beta_slow", "yarn_beta_slow"),
                        ("yarn_mscale_all_dim", "mscale_all_dim"),
                        ("yarn_correction_range_round_to_int", "yarn_correction_range_round_to_int")):
        setattr(config, field, getattr(args, name))


def _moe_fields(args) -> dict:
    """TransformerConfig's mixture-of-experts fields: the args of the same name (as Megatron-LM's
    ``core_transformer_config_from_args`` copies them): which layers have experts, the router's semantics,
    the shared experts and their gate, the expert bias and groups."""
    experts = getattr(args, "num_experts", None)
    if not experts:
        return {}
    same = ("moe_layer_freq", "moe_router_pre_softmax", "moe_router_score_function", "moe_router_topk_scaling_factor",
            "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_enable_expert_bias",
            "moe_router_num_groups", "moe_router_group_topk")
    return dict(num_moe_experts=experts, moe_router_topk=getattr(args, "moe_router_topk", 2),
                moe_token_dispatcher_type="allgather",
                moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size,
                **{name: getattr(args, name) for name in same if getattr(args, name, None) is not None})


def _layer_spec(args, config, vp_stage: int | None):
    """Megatron-LM's choice (``pretrain_gpt``'s model provider, local spec): a mixture of experts gets a block spec
    with an expert or a dense layer spec for each layer of this stage (``moe_layer_freq``), a dense model one layer
    spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    if config.num_moe_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                          vp_stage=vp_stage)
        layer_specs = spec.layer_specs
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=args.normalization,
                                        multi_latent_attention=config.multi_latent_attention)
        layer_specs = [spec]
    if config.multi_latent_attention:
        for layer_spec in layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = _mla_core_attention()
    return spec


def _mtp_spec(config, spec, vp_stage: int | None):
    """Megatron-LM's multi-token prediction block (``gpt_builders``): the decoder's last layer spec, on the last stage."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    return get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage)


def _hybrid_fields(args) -> dict:
    return hybrid_config_fields(args) if getattr(args, "is_hybrid_model", False) else {}


def build_model(args, vp_stage: int | None = None):
    """The GPTModel (or, with pipeline stages, the model chunk of this rank and ``vp_stage``) of ``args``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    mla = _latent_attention_fields(args)
    config = (MLATransformerConfig if mla else TransformerConfig)(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False) else None,
        kv_channels=args.v_head_dim if mla else args.kv_channels, ffn_hidden_size=args.ffn_hidden_size, normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon, gated_linear_unit=_gated(args),
        activation_func=_activation(args), add_bias_linear=args.add_bias_linear,
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)), hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, apply_rope_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        params_dtype=torch.float32, qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        window_size=getattr(args, "window_size", None),
        window_attn_skip_freq=getattr(args, "window_attn_skip_freq", None),
        mtp_num_layers=getattr(args, "mtp_num_layers", None) or None,
        mrope_section=getattr(args, "mrope_section", None),
        **_pipeline_fields(args), **_moe_fields(args), **mla, **_hybrid_fields(args),
        **_sink_and_glu_fields(args),
    )
    _set_yarn_fields(config, args)
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if getattr(args, "is_hybrid_model", False):
        return build_hybrid_model(args, config, pre_process, post_process)
    rope = args.position_embedding_type in ("rope", "mrope", "yarn")
    spec = _layer_spec(args, config, vp_stage)
    return GPTModel(
        config, spec, mtp_block_spec=_mtp_spec(config, spec, vp_stage),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=int(args.rotary_base) if rope else 10000, rotary_percent=float(getattr(args, "rotary_percent", 1.0)),
        rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
        rope_scaling_factor=float(getattr(args, "rope_scaling_factor", 8.0)),
        parallel_output=False,  # gather the vocab-parallel logits on every rank
        pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
    ).eval()


def _run(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's output for ``tokens`` (logits, or a middle stage's hidden states [s, b, h]); always
    pass a causal mask (True = masked) and position ids."""
    batch, length = tokens.shape
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1).expand(batch, 1, length, length)
    positions = torch.arange(length).expand(batch, length)
    with torch.no_grad():
        if getattr(model, "mtp_process", False) and model.post_process:
            return _with_mtp(model, tokens, positions, mask)
        return model(tokens, positions, mask)


def _with_mtp(model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Main and multi-token prediction logits, stacked [1 + mtp_num_layers, b, s, v]: megatron-core computes MTP
    logits only inside its loss (labels required), so the MTP block's output (the main hidden states, then each
    MTP layer's, concatenated on the sequence axis) goes through the model's own output layer here."""
    captured = []
    handle = model.mtp.register_forward_hook(lambda module, args, output: captured.append(output))
    model(tokens, positions, mask, labels=tokens)
    handle.remove()
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    chunks = torch.chunk(captured[0], 1 + model.config.mtp_num_layers, dim=0)
    return torch.stack([model.output_layer(chunk, weight=weight)[0].transpose(0, 1) for chunk in chunks])


def forward(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits for ``tokens`` of a whole model."""
    return _run(model, tokens)[..., :vocab].float()


def pipeline_forward(chunks: list, tokens: torch.Tensor, hidden_size: int, vocab: int) -> torch.Tensor | None:
    """Logits of a model spread over pipeline ranks: stage ``v * PP + p`` is chunk ``v`` of pipeline rank
    ``p``; every rank walks the stages in order, receiving its input from the previous stage's rank and
    sending its output on. The last stage's ranks return the logits, the others None."""
    from megatron.core import parallel_state

    pp, rank = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()
    for stage in range(pp * len(chunks)):
        chunk, owner = divmod(stage, pp)
        if owner != rank:
            continue
        model = chunks[chunk]
        if not model.pre_process:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size)
            torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        output = _run(model, tokens)
        if model.post_process:
            return output[..., :vocab].float()
        torch.distributed.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    return None


def _te_to_local(state: dict) -> dict:
    """Rename Transformer Engine norm keys to the local spec (the documented renames)."""
    renames = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
               "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
               "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
               "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
               "mixer.in_proj.layer_norm_weight": "norm.weight"}
    out = {}
    for key, value in state.items():
        for te, local in renames.items():
            if key.endswith(te):
                key = key[: -len(te)] + local
        if not key.endswith("core_attention._extra_state"):
            out[key] = value
    return out


class _TENormStandIn:
    """What Transformer Engine's ``LayerNorm`` / ``RMSNorm`` add to a norm (TE 1.13 and later build them on its
    operation API, ``transformer_engine/pytorch/ops/op.py``): an ``_extra_state`` in ``state_dict`` and so a
    ``ShardedObject`` in megatron-core's sharded state dict. Without FP8 TE 2.9 and later return an empty uint8
    tensor (2.0-2.8: a pickled ``{}``; 1.13: an empty float tensor); their ``set_extra_state`` returns at once for
    None or an empty tensor and unpickles anything else (refused here: a converted checkpoint holds no FP8 state)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is not None and not (isinstance(state, torch.Tensor) and state.numel() == 0):
            raise ValueError(f"a norm's extra state without FP8 is None or empty, not {state!r}")


def _te_norms(model, args) -> None:
    """Give the norms megatron-core's Transformer Engine spec builds as ``TENorm`` (``final_layernorm``; q/k norms;
    a MoE layer's ``pre_mlp_layernorm``; MLA's ``input_layernorm``; the others are fused into linear layers) the
    extra state of :class:`_TENormStandIn`, for a checkpoint written for Transformer Engine."""
    if getattr(args, "transformer_impl", "local") != "transformer_engine":
        return
    from megatron.core.transformer.moe.moe_layer import MoELayer

    mla = bool(getattr(args, "multi_latent_attention", False))
    for name, module in model.named_modules():
        layer = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        last = name.rsplit(".", 1)[-1]
        if (last == "final_layernorm" or (last in ("q_layernorm", "k_layernorm") and not mla)
                or (last == "input_layernorm" and mla)
                or (last == "pre_mlp_layernorm" and isinstance(getattr(layer, "mlp", None), MoELayer))):
            if hasattr(module, "weight") and not isinstance(module, _TENormStandIn):  # not an IdentityOp
                module.__class__ = type(f"TE{type(module).__name__}", (_TENormStandIn, type(module)), {})


def _rank_file_pipeline(ckpt: Path) -> tuple[int, int | None]:
    """(PP, VPP or None) of a rank-file tree, from its args (any rank's: they are the same)."""
    first = sorted((ckpt / "release").glob("mp_rank_*/model_optim_rng.pt"))[0]
    args = torch.load(first, weights_only=False)["args"]
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    return args.pipeline_model_parallel_size, vpp if vpp and vpp > 1 else None


def logits_command(rank: int, tp: int, ep: int, pp: int, vpp: int | None, ckpt: Path, tokens: Path, out: Path) -> None:
    _init_cpu_megatron(rank, tp, ep, pp, vpp)
    _rank_file_logits(pp, vpp, ckpt, tokens, out)


def _rank_file_logits(pp: int, vpp: int | None, ckpt: Path, tokens: Path, out: Path) -> None:
    """Each rank loads its own rank file (its ``model`` or ``model0``, ``model1``... chunks); the first
    TP and EP rank of the last pipeline stage saves the gathered logits."""
    from megatron.core import parallel_state

    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    ep_rank, ep = parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
    state = torch.load(ckpt / "release" / name / "model_optim_rng.pt", weights_only=False)
    args = state["args"]
    chunks = []
    for chunk in range(vpp or 1):
        model = build_model(args, vp_stage=chunk if vpp else None)
        _te_norms(model, args)
        model.load_state_dict(_te_to_local(state[f"model{chunk}" if vpp else "model"]), strict=True)
        chunks.append(model)
    logits = pipeline_forward(chunks, torch.load(tokens), args.hidden_size, args.vocab_size)
    if logits is not None and tp_rank == 0 and ep_rank == 0:
        _save(logits, out)


# megatron-core 0.16.1 adds an expert's linear_fc2 bias on every expert-TP rank before their partial outputs are summed
# (transformer/mlp.py MLP.forward, lines 241-248: the expert RowParallelLinear leaves its reduction to the token
# dispatcher, tensor_parallel/layers.py lines 1286-1288), so a random model at TP > 1 keeps those biases at zero
EXPERT_FC2_BIAS = re.compile(r"mlp\.experts\..*linear_fc2\.bias")


def _random_model(spec: Path, tp_rank: int = 0, tp: int = 1):
    """A GPTModel with random weights from a JSON spec of Megatron args, and the args Megatron would store.

    With tensor parallelism every rank draws each parameter's full tensor from the same seed and keeps
    its chunk along the parameter's ``partition_dim``: replicated parameters are equal on every rank.
    """
    fields = json.loads(spec.read_text())
    args = argparse.Namespace(**{**fields, "params_dtype": torch.float32, "tensor_model_parallel_size": tp,
                                 "pipeline_model_parallel_size": 1, "checkpoint_version": 3.0,
                                 "transformer_impl": "local"})
    model = build_model(args)
    if tp == 1:
        randomize(model, fields.get("seed", 0))
        return args, model
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            split = getattr(param, "tensor_model_parallel", False)
            dim = getattr(param, "partition_dim", 0) if split else 0
            shape = list(param.shape)
            shape[dim] *= tp if split else 1
            generator = torch.Generator().manual_seed(fields.get("seed", 0) * 1000 + index)
            full = random_weight(name, shape, generator)
            param.copy_(full.chunk(tp, dim)[tp_rank] if split else full)
            if EXPERT_FC2_BIAS.search(name):
                param.zero_()
    return args, model


def make_command(spec: Path, out: Path, tokens: Path) -> None:
    """An mp_rank tree (``--ckpt-format torch``) holding the model's own ``state_dict()``."""
    args, model = _random_model(spec)
    rank_dir = out / "release" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model.state_dict()},
               rank_dir / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save(forward(model, torch.load(tokens), args.vocab_size), out.parent / "megatron_logits.pt")


def dist_make_command(rank: int, tp: int, spec: Path, out: Path, tokens: Path) -> None:
    _init_cpu_megatron(rank, tp)
    _dist_make(tp, spec, out, tokens, out.parent / "megatron_logits.pt")


def _dist_make(tp: int, spec: Path, out: Path, tokens: Path, logits_out: Path) -> None:
    """A torch_dist checkpoint saved by ``dist_checkpointing.save`` from ``tp`` ranks, as Megatron-LM's
    save_checkpoint does (args, version and iteration beside the model's sharded state dict and the
    training state), in ``iter_0000001``; rank 0 saves the model's logits."""
    from megatron.core import dist_checkpointing, parallel_state

    args, model = _random_model(spec, parallel_state.get_tensor_model_parallel_rank(), tp)
    args.ckpt_format = "torch_dist"
    iter_dir = out / "iter_0000001"
    iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    training = _training_state(model, args)
    state = {**training, "args": args, "checkpoint_version": 3.0, "iteration": 1,
             "model": {**model.sharded_state_dict(), **training["model"]}}
    dist_checkpointing.save(state, str(iter_dir))
    logits = forward(model, torch.load(tokens), args.vocab_size)
    if torch.distributed.get_rank() == 0:
        (out / "latest_checkpointed_iteration.txt").write_text("1")
        torch.save(logits, logits_out)


def _training_state(model, args) -> dict:
    """What Megatron-LM's ``save_checkpoint`` stores beside the model in a torch_dist checkpoint
    (``generate_state_dict``; converters must skip all of it):

    - ``rng_state``: ``get_rng_state``'s ShardedObject of shape (PP, TP) holding a one-item list of
      ``{random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state, rng_tracker_states}``;
    - ``optimizer``: the distributed optimizer's moments and fp32 main parameters as sharded tensors
      (``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>``), its param groups and sharding type
      (plain values: ``common.pt``); ``opt_param_scheduler`` and the FLOP count (``common.pt``);
    - Transformer Engine's extra state as TE < 1.13 returned it (an ``io.BytesIO`` of ``torch.save`` of the
      FP8 scales) in the model's own ``_extra_state`` ShardedObjects (which the local spec leaves None):
      byte entries in the data files;
    - FP8 training settings in ``args``.

    The extra states are returned under ``model``, to replace the model's own entries.
    """
    import dataclasses
    import io
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.transformer.enums import AttnBackend

    tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    args.__dict__.update(fp8="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=16,
                         fp8_amax_compute_algo="max", attention_backend=AttnBackend.auto, use_distributed_optimizer=True)
    weights = [t for t in model.sharded_state_dict().values() if isinstance(t, ShardedTensor)]
    optimizer = {moment: [dataclasses.replace(t, key=f"optimizer.state.{moment}.{t.key}", data=torch.zeros_like(t.data))
                          for t in weights] for moment in ("exp_avg", "exp_avg_sq", "fp32_param")}
    rng = [{"random_rng_state": random.Random(tp_rank).getstate(), "np_rng_state": np.random.RandomState(tp_rank).get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}]
    extra = {}
    for index, (name, entry) in enumerate(model.sharded_state_dict().items()):
        if isinstance(entry, ShardedObject) and entry.key.endswith("_extra_state"):
            buffer = io.BytesIO()
            torch.save({"scale_fwd": torch.ones(3), "amax_history_fwd": torch.full((16, 3), float(index))}, buffer)
            extra[name] = dataclasses.replace(entry, data=buffer)
    return {"optimizer": {"state": optimizer, "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "step": 10,
                                                                  "wd_mult": 1.0, "params": [0, 1]}],
                          "param_state_sharding_type": "fully_sharded_model_space"},
            "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 2560, "lr_decay_style": "cosine"},
            "num_floating_point_operations_so_far": 1.5e15,
            "rng_state": ShardedObject("rng_state", rng, (1, tp), (0, tp_rank),
                                       replica_id=parallel_state.get_data_parallel_rank()),
            "model": extra}


def dist_logits_command(rank: int, tp: int, ckpt: Path, tokens: Path, out: Path) -> None:
    _init_cpu_megatron(rank, tp)
    _dist_logits(tp, ckpt, tokens, out)


def _dist_args(ckpt: Path):
    """The iteration directory and args of a torch_dist tree: common.pt's, or for a Megatron-Bridge tree the
    Megatron-LM args of the model its run_config.yaml describes, as this tool reads that file (megatron-core's
    loader still wants common.pt, but not its args)."""
    from checkpoint_convert.commands.entry import load_families
    from checkpoint_convert.formats.megatron_args import CheckpointFacts, ParallelLayout, arch_from_args, args_from_arch
    from checkpoint_convert.formats.megatron_formats import open_megatron_tree

    load_families()  # the provider classes run_config.yaml may name
    registered = torch.serialization.get_safe_globals()  # megatron-core's; leaving safe_load's context removes
    tree = open_megatron_tree(ckpt)                      # the globals it allowed (argparse.Namespace) from them
    torch.serialization.add_safe_globals(registered)
    if tree.args_file.name != "run_config.yaml":
        return tree.iter_dir, torch.load(tree.iter_dir / "common.pt", weights_only=False)["args"]
    arch = arch_from_args(tree.args, str(tree.args_file))
    facts = CheckpointFacts(padded_vocab=arch.vocab_size, dtype=arch.params_dtype, divisible_by=1,
                            impl=tree.args.transformer_impl, ckpt_format="torch_dist")
    return tree.iter_dir, args_from_arch(arch, ParallelLayout(stages=(arch.num_layers,)), facts)


def _dist_logits(tp: int, ckpt: Path, tokens: Path, out: Path) -> None:
    """Each of ``tp`` ranks loads its shards of a torch_dist checkpoint with ``dist_checkpointing.load`` into
    a GPTModel (every key it asks for must exist, strict ``load_state_dict``); rank 0 saves the logits."""
    from megatron.core import dist_checkpointing

    iter_dir, args = _dist_args(ckpt)
    args.tensor_model_parallel_size = tp
    model = build_model(args)
    _te_norms(model, args)
    # every key the model asks for must be there; a Transformer Engine checkpoint also holds its attention's extra
    # state, which the local attention does not ask for
    te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir),
                                    strict="raise_unexpected" if te else "raise_all")
    model.load_state_dict(state["model"], strict=True)
    logits = forward(model, torch.load(tokens), args.vocab_size)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out)


def vl_logits_command(rank: int, tp: int, pp: int, ckpt: Path, inputs: Path, out: Path,
                      hf_config: Path | None = None) -> None:
    """The language model of a vision-language checkpoint at ``tp`` x ``pp`` ranks, loaded strictly (every key it asks
    for, strict ``load_state_dict``): Megatron-Bridge's ``language_model.*``, or with ``hf_config`` MindSpeed-MM's
    ``text_decoder.*`` from each rank's own file; fed Hugging Face's merged input embeddings and 3-D position ids
    (``inputs``: ``ids``, ``embeds`` [b, s, h], ``positions`` [3, b, s]); hidden states pass between pipeline stages
    with gloo send/recv; the last stage's first rank saves the logits."""
    _init_cpu_megatron(rank, tp, pp=pp)
    model, args = (_mindspeed_mm_language_model if hf_config else _bridge_language_model)(tp, ckpt, hf_config)
    _vl_forward(model, args, torch.load(inputs), out)


def _bridge_language_model(tp: int, ckpt: Path, _: None):
    from megatron.core import dist_checkpointing

    iter_dir, args = _dist_args(ckpt)
    args.tensor_model_parallel_size = tp
    model = build_model(args)
    prefix = "language_model."
    state = dist_checkpointing.load({"model": model.sharded_state_dict(prefix=prefix)}, str(iter_dir),
                                    strict="raise_unexpected")  # checkpoint keys it does not ask for: the vision tower
    model.load_state_dict({key[len(prefix):]: value for key, value in state["model"].items()}, strict=True)
    return model, args


def _mindspeed_mm_language_model(tp: int, ckpt: Path, hf_config: Path):
    """MindSpeed-MM's files record no args: the language model's, as this tool reads the architecture from the Hugging
    Face config (as MindSpeed-MM's mm_to_hf takes it) and the pipeline split from the files; each rank loads the
    ``text_decoder.*`` tensors of its own rank file."""
    from megatron.core import parallel_state

    from checkpoint_convert.commands.entry import load_families
    from checkpoint_convert.engine.sources import open_checkpoint
    from checkpoint_convert.formats.megatron_args import CheckpointFacts, ParallelLayout, args_from_arch
    from checkpoint_convert.formats.mindspeed_mm import rank_dir

    load_families()
    source = open_checkpoint(ckpt, hf_config_dir=hf_config)
    stages, arch = source.tensors.splits[None], source.arch
    facts = CheckpointFacts(padded_vocab=arch.vocab_size, dtype=arch.params_dtype, divisible_by=1, impl="local",
                            ckpt_format="torch")
    args = args_from_arch(arch, ParallelLayout(tp=tp, pp=len(stages), stages=stages), facts)
    model = build_model(args)
    name = rank_dir(parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
                    len(stages))
    state = torch.load(ckpt / "release" / name / "model_optim_rng.pt", weights_only=True)["model"]
    prefix = "text_decoder."
    model.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)},
                          strict=True)
    return model, args


def _vl_forward(model, args, given: dict, out: Path) -> None:
    """This rank's stage on the given embeddings and 3-D positions (a causal mask); the last stage saves the logits."""
    from megatron.core import parallel_state

    batch, length = given["embeds"].shape[:2]
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1).expand(batch, 1, length, length)
    embeds = given["embeds"].transpose(0, 1).contiguous() if model.pre_process else None
    with torch.no_grad():
        if not model.pre_process:
            hidden = torch.empty(length, batch, args.hidden_size)
            torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        output = model(given["ids"], given["positions"], mask, decoder_input=embeds)
    if not model.post_process:
        torch.distributed.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    elif parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(output[..., :args.vocab_size].float(), out)


def batch_command(rank: int, world: int, jobs: list[dict]) -> None:
    """Jobs run one after another in the same ``world`` processes, which pay megatron-core's imports once.

    A job is a dict: ``kind`` (``logits``, ``dist-logits`` or ``dist-make``), ``name``, paths
    ``ckpt``/``spec``, ``tokens``, ``out`` (and ``logits_out`` for ``dist-make``), and ``tp``/``ep``.
    Jobs are grouped by parallel layout (PP and VPP of a rank-file tree from its args), and the
    model-parallel groups are set up once per layout: megatron-core never destroys the gloo groups it
    replaces, whose threads would pile up. Ranks beyond a layout's are data-parallel replicas.
    """
    from megatron.core import parallel_state

    _init_cpu_megatron(rank, world=world)
    current = (1, 1, 1, None)
    for layout, job in sorted(((_job_layout(job), job) for job in jobs), key=lambda pair: str(pair[0])):
        if rank == 0:
            print(f"oracle job {job['name']}", file=sys.stderr, flush=True)
        if layout != current:
            parallel_state.destroy_model_parallel()
            _init_parallel(*layout)
            current = layout
        try:
            _run_job(job, layout)
        except Exception as error:
            raise RuntimeError(f"oracle job {job['name']} failed on rank {rank}") from error
        torch.distributed.barrier()


def _job_layout(job: dict) -> tuple[int, int, int, int | None]:
    """(TP, EP, PP, VPP) a batch job runs at."""
    pp, vpp = _rank_file_pipeline(Path(job["ckpt"])) if job["kind"] == "logits" else (1, None)
    return job.get("tp", 1), job.get("ep", 1), pp, vpp


def _run_job(job: dict, layout: tuple[int, int, int, int | None]) -> None:
    tp, _, pp, vpp = layout
    paths = {key: Path(value) for key, value in job.items() if key in ("ckpt", "spec", "tokens", "out", "logits_out")}
    if job["kind"] == "logits":
        _rank_file_logits(pp, vpp, paths["ckpt"], paths["tokens"], paths["out"])
    elif job["kind"] == "dist-logits":
        _dist_logits(tp, paths["ckpt"], paths["tokens"], paths["out"])
    else:
        _dist_make(tp, paths["spec"], paths["out"], paths["tokens"], paths["logits_out"])


def _ranked(rank: int, command, *args) -> None:
    """Run one rank's command, then leave together and tear the process groups down: gloo threads still
    running at interpreter exit can abort the process ("terminate called without an active exception")."""
    command(rank, *args)
    from megatron.core import parallel_state

    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _free_port()
    command, *rest = sys.argv[1:]
    if command == "logits":
        ckpt, tokens, out = Path(rest[0]), Path(rest[1]), Path(rest[2])
        tp, ep = (int(rest[3]), int(rest[4])) if len(rest) > 4 else (1, 1)
        pp, vpp = _rank_file_pipeline(ckpt)
        torch.multiprocessing.spawn(_ranked, args=(logits_command, tp, ep, pp, vpp, ckpt, tokens, out),
                                    nprocs=tp * ep * pp)
    elif command == "dist-make":
        spec, out, tokens = Path(rest[0]), Path(rest[1]), Path(rest[2])
        tp = int(rest[3]) if len(rest) > 3 else 1
        torch.multiprocessing.spawn(_ranked, args=(dist_make_command, tp, spec, out, tokens), nprocs=tp)
    elif command == "dist-logits":
        ckpt, tokens, out = Path(rest[0]), Path(rest[1]), Path(rest[2])
        tp = int(rest[3]) if len(rest) > 3 else 1
        torch.multiprocessing.spawn(_ranked, args=(dist_logits_command, tp, ckpt, tokens, out), nprocs=tp)
    elif command == "vl-logits":
        ckpt, inputs, out, tp, pp = Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]), int(rest[4])
        hf_config = Path(rest[5]) if len(rest) > 5 else None  # a MindSpeed-MM tree's Hugging Face config directory
        torch.multiprocessing.spawn(_ranked, args=(vl_logits_command, tp, pp, ckpt, inputs, out, hf_config),
                                    nprocs=tp * pp)
    elif command == "batch":
        world, jobs = int(rest[1]), json.loads(Path(rest[0]).read_text())
        torch.multiprocessing.spawn(_ranked, args=(batch_command, world, jobs), nprocs=world)
    else:
        _init_cpu_megatron()
        make_command(*map(Path, rest))
