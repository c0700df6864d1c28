"""megatron-core's LLaVAModel on CPU, in its own process: ``python tests/llava_oracle.py CKPT INPUTS OUT TP PP``.

TP x PP gloo ranks each build LLaVAModel (local spec, no Transformer Engine) from the args of their own rank file, as
Megatron-LM's ``examples/multimodal/model.py`` builds it (language model from the GPT args, vision model of
``vision_model_type`` clip or internvit300M with the sizes our args record, MLP projector with gelu, normed for
InternViT), load the file with
``load_state_dict(strict=True)`` and run the fixed image and text (INPUTS: ``ids`` with one image token, ``pixels``);
the first rank saves the logits [b, combined sequence, vocab].
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.megatron_oracle import _dist_args, _free_port, _init_cpu_megatron, _layer_spec, _ranked, build_model  # noqa: E402


def _vision_config(args):
    from megatron.core.activations import quick_gelu
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads = args.vision_num_attention_heads
    config = TransformerConfig(
        num_layers=args.vision_num_layers, hidden_size=args.vision_hidden_size, num_attention_heads=heads,
        num_query_groups=heads, kv_channels=args.vision_hidden_size // heads, ffn_hidden_size=args.vision_ffn_hidden_size,
        normalization="LayerNorm", layernorm_epsilon=args.vision_layernorm_epsilon, add_bias_linear=True,
        add_qkv_bias=True, gated_linear_unit=False,
        activation_func=quick_gelu if args.vision_activation == "quick_gelu" else F.gelu, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, params_dtype=torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size)
    config.vision_model_type = args.vision_model_type
    return config


def _projection_config(args):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=args.hidden_size, ffn_hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu, bias_activation_fusion=False,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, params_dtype=torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        layernorm_epsilon=getattr(args, "vision_projection_layernorm_epsilon", 1e-5))


def _torch_norms_for_the_vision_model() -> None:
    """Without Transformer Engine, 0.16.1's CLIPViTModel defaults ``ln_pre``/``ln_post`` to torch's LayerNorm, which
    its ``build_module`` call (``config=``) cannot build: megatron-core's own torch norm wrapper instead."""
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    CLIPViTModel.__init__.__defaults__ = (WrappedTorchNorm, WrappedTorchNorm) + CLIPViTModel.__init__.__defaults__[2:]
    from megatron.core.fusions import fused_softmax  # its default causal mask is built on device "cuda"
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _vit_local_spec():
    """0.16.1's local ViT layer spec (``get_vit_layer_with_local_spec``) masks attention causally, its Transformer
    Engine spec (what Megatron-LM trains with) does not: a ViT sees every patch, so the local one unmasked here."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


# ---- InternViT-300M (``vision_model_type`` internvit300M): Megatron-LM builds it from modules megatron-core does not
# have (``examples/multimodal/nvlm/internvit.py``, ``layer_scaling.py``, and a projector of Transformer Engine's
# ``LayerNormColumnParallelLinear``); the two stand-ins below compute what those do, with their parameter names


def _layer_scaled_bda(scale, training: bool, fused: bool):
    """Megatron-LM's ``get_bias_dropout_add_layer_scaling``: residual + dropout(x + bias) * scale."""
    def add(x_with_bias, residual, prob):
        x, bias = x_with_bias
        x = x if bias is None else x + bias
        return residual + F.dropout(x, p=prob, training=training) * scale
    return add


def _layer_scaled_vit_spec():
    """Megatron-LM's ``get_internvit300M_layer_spec`` on megatron-core's local modules: the ViT layer (LayerNorms,
    biased fused qkv, no qk norm, unmasked attention) as its ``LayerScalingTransformerLayer``, which scales the
    attention and MLP branches by the learned ``ls1`` / ``ls2`` before each residual add."""
    from functools import partial

    from megatron.core.transformer.transformer_layer import TransformerLayer

    class LayerScalingTransformerLayer(TransformerLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ls1 = torch.nn.Parameter(torch.ones(self.config.hidden_size))
            self.ls2 = torch.nn.Parameter(torch.ones(self.config.hidden_size))
            self.self_attn_bda = partial(_layer_scaled_bda, self.ls1)
            self.mlp_bda = partial(_layer_scaled_bda, self.ls2)

    spec = _vit_local_spec()
    spec.module = LayerScalingTransformerLayer
    return spec


def _normed_column_linear():
    """Transformer Engine's ``LayerNormColumnParallelLinear`` (LayerNorm, then the column-parallel linear) as
    megatron-core's local ``ColumnParallelLinear`` with the norm's ``layer_norm_weight`` / ``layer_norm_bias``."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size))
            self.eps = config.layernorm_epsilon

        def forward(self, input_, *args, **kwargs):
            normed = F.layer_norm(input_, input_.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
            return super().forward(normed, *args, **kwargs)
    return LayerNormColumnParallelLinear


def _vision_specs(args):
    """(vision layer spec, projector's fc1) for the vision model type the args name."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    if args.vision_model_type == "internvit300M":
        return _layer_scaled_vit_spec(), _normed_column_linear()
    return _vit_local_spec(), ColumnParallelLinear


def build_llava(args, **stage: bool):
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    _torch_norms_for_the_vision_model()
    language = build_model(args).config
    vision_layer, projector_fc1 = _vision_specs(args)
    return LLaVAModel(
        language_transformer_config=language, language_transformer_layer_spec=_layer_spec(args, language, None),
        language_vocab_size=args.padded_vocab_size, language_max_sequence_length=args.max_position_embeddings,
        vision_transformer_config=_vision_config(args), vision_transformer_layer_spec=vision_layer,
        drop_vision_class_token=args.disable_vision_class_token, vision_projection_config=_projection_config(args),
        vision_projection_layer_spec=MLPSubmodules(linear_fc1=projector_fc1, linear_fc2=RowParallelLinear),
        vision_projection_type=args.vision_projection_type, parallel_output=False, pixel_shuffle=args.pixel_shuffle,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        language_position_embedding_type=args.position_embedding_type, language_rotary_base=int(args.rotary_base),
        img_h=args.img_h, img_w=args.img_w, patch_dim=args.patch_dim, image_token_index=args.image_token_index, **stage,
    ).eval()


def build_stage(args):
    """This rank's LLaVAModel: the vision model and projector with the language model's first stage (as
    Megatron-LM's examples/multimodal place them), the language model alone on later stages."""
    from megatron.core import parallel_state

    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    return build_llava(args, pre_process=first, post_process=last, add_encoder=first)


def _load(build, ckpt: Path, tp_rank: int, pp_rank: int, pp: int) -> dict:
    """This rank's model, loaded strictly: from its rank file, or from a ``torch_dist`` checkpoint through
    megatron-core's ``dist_checkpointing.load`` (every key the model asks for, none left over) and then
    ``load_state_dict(strict=True)``."""
    from megatron.core import dist_checkpointing

    if any((ckpt / "release").glob("mp_rank_*")):
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
        state = torch.load(ckpt / "release" / name / "model_optim_rng.pt", weights_only=False)
        model = build(state["args"])
        model.load_state_dict(state["model"], strict=True)
        return {"args": state["args"], "built": model}
    iter_dir, args = _dist_args(ckpt)
    args.tensor_model_parallel_size = torch.distributed.get_world_size() // pp
    model = build(args)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir), strict="raise_all")
    model.load_state_dict(loaded["model"], strict=True)
    return {"args": args, "built": model}


def logits_command(rank: int, tp: int, pp: int, ckpt: Path, inputs: Path, out: Path) -> None:
    """Each rank loads its own rank file strictly; hidden states pass between pipeline stages with gloo send/recv; the
    last stage's first tensor-parallel rank saves the logits."""
    from megatron.core import parallel_state as ps

    _init_cpu_megatron(rank, tp, pp=pp)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    state = _load(build_stage, ckpt, tp_rank, pp_rank, pp)
    model = state["built"]
    given = torch.load(inputs)
    ids, combined = given["ids"], given["ids"].shape[1] - 1 + model.img_seq_len
    # with pipeline stages, LLaVAModel pads the combined sequence to the language model's maximum length (fixed shapes
    # between stages); the padding comes after the input, which a causal mask keeps from changing it
    length = state["args"].max_position_embeddings if pp > 1 else combined
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1).expand(1, 1, length, length)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(length, 1, state["args"].hidden_size)
        torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        output, _ = model(given["pixels"], ids, torch.arange(ids.shape[1]).unsqueeze(0), mask,
                          num_image_tiles=torch.tensor([1], dtype=torch.int))
    if not ps.is_pipeline_last_stage():
        torch.distributed.send(output.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    elif tp_rank == 0:
        torch.save(output[:, :combined, :state["args"].vocab_size].float(), out)


if __name__ == "__main__":
    _free_port()
    ckpt, inputs, out, tp, pp = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.multiprocessing.spawn(_ranked, args=(logits_command, tp, pp, ckpt, inputs, out), nprocs=tp * pp)
