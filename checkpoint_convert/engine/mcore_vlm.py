"""megatron-core's multimodal model (``LLaVAModel``) in Megatron-LM rank files and ``torch_dist``, as a source
and a target.

megatron-core names the towers ``vision_model.`` (its ``CLIPViTModel``: ``conv1``, ``position_embeddings``,
``class_token``, ``ln_pre`` / ``ln_post``, ``decoder.layers.N.`` as a GPT layer's), ``vision_projection.encoder.``
(an MLP) and the language model ``language_model.`` (a GPT model's names); Megatron-LM's ``saver_llava`` writes them
so, the vision tower and projector on the first pipeline stage, split by tensor parallelism as the language model's
layers are. A family declares the layout as a ``TowerLayout`` (``FamilySpec.mcore_vlm``): its towers' tables, the
language model's prefix and the args the trainer reads. The rank files, args and splits are the core's own
(``streams.MegatronTarget`` / ``MegatronSource``, ``megatron_io``); this module chooses the tables.
"""
from __future__ import annotations

from typing import Any

from ..base.errors import BadInputError
from ..model.arch import ModelArch
from ..model.family import FamilySpec, in_layout, layout_flags
from .relayout import read_through


def mcore_vlm_family(family: FamilySpec, arch: ModelArch | None = None, tp: int = 1) -> FamilySpec:
    """The family with megatron-core's multimodal towers and names; refused in one line when it declares none or,
    given the architecture of a checkpoint read in the layout, when the layout cannot express it (its trained model
    would compute other logits than the Hugging Face one)."""
    if family.mcore_vlm is None:
        raise BadInputError(f"a {family.name} model has towers beside its language model (vision encoder, merger); "
                            f"it is written in a layout that holds them: {layout_flags(family)}")
    if arch is not None:
        layout_args(family, arch, tp)  # raises for what the layout cannot express
    return in_layout(family, family.mcore_vlm)


def read_as_mcore_vlm(source: Any, legacy: bool) -> None:
    """Read ``source`` through the layout's tables from now on (a Hugging Face source by its names, another Megatron
    layout's through the Hugging Face tensors both tables name); rank files or ``torch_dist``, megatron-core's."""
    family = mcore_vlm_family(source.family)
    if legacy:
        raise BadInputError(f"a {family.name} model is written in megatron-core's multimodal layout "
                            "(--megatron_format mcore), not in the legacy GPT model's")
    if source.kind == "megatron" and source.family.towers == family.towers:
        return  # read through them already
    read_through(source, family)


# Megatron-LM's ``loader_llava`` builds its configs with ``core_transformer_config_from_args`` on the checkpoint's own
# args namespace (not a freshly parsed one, as ``loader_core`` does), so the fields that function reads by name must be
# there; Megatron-LM itself saves every argument. These are its parser's defaults (tag core_v0.17.1,
# ``megatron/training/arguments.py``) for the fields our args do not otherwise carry.
LOADER_LLAVA_DEFAULTS: dict[str, Any] = {
    "bias_swiglu_fusion": False, "config_logger_dir": "", "cp_comm_type": ["p2p"], "fp4_param_gather": False,
    "fp8_param_gather": False, "heterogeneous_layers_config_path": None, "hybrid_layer_pattern": None,
    "init_method_xavier_uniform": False, "kitchen_config_file": None, "kitchen_recipe_number": None,
    "moe_latent_size": None, "no_persist_layer_norm": False, "overlap_p2p_comm": False, "rope_type": None,
    "seed": 1234, "te_precision_config_file": None, "use_kitchen_attention": False,
}


def layout_args(family: FamilySpec, arch: ModelArch, tp: int) -> dict[str, Any]:
    """The args the layout's trainer reads beyond the language model's (the family's ``megatron_args``)."""
    layout = family.mcore_vlm
    return layout.megatron_args(arch, tp) if layout and layout.megatron_args else {}


def add_layout_args(args: Any, layout: dict[str, Any]) -> None:
    """The layout's args set on ``args``, and Megatron-LM's defaults where ``args`` lacks a field ``loader_llava``
    reads. Its multimodal trainer takes the language model's sequence length from ``decoder_seq_length`` (and sets
    ``seq_length`` to the image's)."""
    vars(args).update(layout)
    if getattr(args, "decoder_seq_length", None) is None:
        args.decoder_seq_length = args.seq_length
    args.use_te = getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine"  # its layer specs
    for key, value in LOADER_LLAVA_DEFAULTS.items():
        vars(args).setdefault(key, value)


def trained_vlm_without_hf_config(args: Any) -> bool:
    """Args of megatron-core's multimodal model written by Megatron-LM itself (its ``--vision-model-type``), which
    record no Hugging Face config of their own (ours keep it in ``hf_extra_config``)."""
    return bool(getattr(args, "vision_model_type", None)) and not getattr(args, "hf_extra_config", None)
