"""The family kit's registry: tiny test models of every registered family, one entry per variant.

A new family gets the whole kit (``tests/test_family_kit.py``: every direction and layout, reshapes,
torch_dist, megatron-core's own logits, inspect and verify) by adding its variants here; the kit
fails while a registered family has none. A variant builds a tiny random model from the family's
transformers classes (fp32, 4 layers, hidden 64, 4 heads): keep sizes divisible by TP 2 (heads,
query groups, ffn, expert and shared expert ffn) and, for mixture-of-experts families, the experts by EP 4.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tests.helpers import randomize, tiny_gpt2

# config values every Llama-shaped variant shares; a variant overrides any of them
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Variant:
    """One tiny model of a family.

    ``build(path)`` saves it as a Hugging Face model directory and returns the model. ``legacy``: the
    legacy Megatron model can hold it (else the kit checks that ``--megatron_format legacy`` is refused).
    ``experts``: a mixture-of-experts model (the kit adds expert-parallel layouts). ``detected_as``: the
    family a Megatron checkpoint of it is taken for when its args do not name one (a Megatron-LM run's);
    None: its own. ``routing``: the routing features its experts' logits depend on (the kit checks that
    megatron-core misses them without each: ``tests/test_family_kit.py`` ``WRONG_ROUTINGS``).
    """

    name: str
    family: str
    build: Callable[[Path], Any]
    legacy: bool = True
    experts: bool = False
    detected_as: str | None = None
    routing: tuple[str, ...] = ("softmax_order",)
    # the Hugging Face model_type of the variant's config.json when it is not the family's name (Kimi-K2's)
    model_type: str | None = None


def hf_model(config_class: str, model_class: str, seed: int, zero: tuple[str, ...] = (),
             random_buffers: tuple[str, ...] = (), base: dict | None = None, **config: Any) -> Callable:
    """A builder of a random transformers model of ``config_class`` (``TINY`` values, then ``config``).

    ``zero``: parameter name suffixes set to zero, for tensors Megatron's architecture fixes at zero
    (e.g. the o_proj bias of a model that Megatron biases on qkv only). ``random_buffers``: buffer name
    suffixes of weights kept as buffers (a router's expert bias), drawn from N(0, 0.5^2) instead of their zeros.
    ``base``: the config values to start from instead of ``TINY``.
    """
    def build(path: Path):
        import transformers

        cfg = getattr(transformers, config_class)(**{**(TINY if base is None else base), **config})
        model = randomize(getattr(transformers, model_class)(cfg), seed).eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(zero):
                    param.zero_()
            for name, buffer in model.named_buffers():
                if random_buffers and name.endswith(random_buffers):
                    buffer.copy_(0.5 * torch.randn(buffer.shape, generator=generator))
        model.save_pretrained(path)
        return model
    return build


def gpt2(seed: int, **kwargs: Any) -> Callable:
    return lambda path: tiny_gpt2(path, seed=seed, **kwargs)


def llama(seed: int, **config: Any) -> Callable:
    return hf_model("LlamaConfig", "LlamaForCausalLM", seed, head_dim=24, **config)


LLAMA3_ROPE = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # megatron-core's fixed 8192
QWEN_ROPE = {"rope_theta": 1000000.0, "rope_type": "default"}
# top-2 of 4 experts of 32 (renormalising the two weights or not changes the logits); a variant overrides any
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.02,
                rope_parameters=QWEN_ROPE)


def qwen_moe(family: str, seed: int, **config: Any) -> Callable:
    config_class, model_class = {"qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
                                 "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}[family]
    return hf_model(config_class, model_class, seed, **{**QWEN_MOE, **config})


# multi-latent attention: 4 heads of 16 key rows without rotary + 8 rotary rows, 12 value rows; every layer
# dense (first_k_dense_replace = num_hidden_layers); YaRN with mscale on the q_lora variant
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
           first_k_dense_replace=4, n_routed_experts=4, moe_intermediate_size=32, n_group=2, topk_group=1,
           num_experts_per_tok=2)
# DeepSeekMoE: layer 0 dense, then 8 experts of 16 and 2 shared experts; V3: sigmoid scores plus a random expert bias,
# 2 of 4 groups chosen by their best two scores (top-4: 4 // 2 = 2, as megatron-core ranks them), weights
# renormalised then scaled by 2.5; V2: softmax over every expert, 2 of 4 groups by their best score (top-3: 3 // 2 = 1), x 2.0
DEEPSEEK_MOE = dict(MLA, first_k_dense_replace=1, n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=2,
                    n_group=4, topk_group=2)
DEEPSEEK_V3_MOE = dict(DEEPSEEK_MOE, num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True)
DEEPSEEK_V2_MOE = dict(DEEPSEEK_MOE, num_experts_per_tok=3, routed_scaling_factor=2.0, topk_method="group_limited_greedy")
DEEPSEEK_YARN = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
# GLM-4.5: biased q/k/v (no o_proj bias), half of each head rotated (partial_rotary_factor 0.5), layer 0 dense, then
# DeepSeek-V3's experts and router (8 experts of 16, 2 shared; 2 of 4 groups; top-4 renormalised, x 2.5)
GLM_MOE = dict(first_k_dense_replace=1, n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=2, n_group=4,
               topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
               rope_parameters={"rope_theta": 1000000.0, "rope_type": "default", "partial_rotary_factor": 0.5})


def kimi_k2(seed: int, **config: Any) -> Callable:
    """A DeepSeek-V3 model saved as Kimi-K2 ships it: model_type kimi_k2, DeepSeek's own code (auto_map) and its
    routing keys (transformers has no class for it)."""
    build_v3 = hf_model("DeepseekV3Config", "DeepseekV3ForCausalLM", seed, **config)

    def build(path: Path):
        import json

        model = build_v3(path)
        values = json.loads((path / "config.json").read_text())
        values.update(model_type="kimi_k2", topk_method="noaux_tc", scoring_func="sigmoid", ep_size=1,
                      auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
        (path / "config.json").write_text(json.dumps(values, indent=2))
        return model
    return build


# gpt-oss: top-2 of 4 experts of 32 (down_proj [32, 64], not square: a transposed one fails by shape too)
GPT_OSS_YARN = {"rope_theta": 150000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
GPT_OSS = dict(head_dim=24, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=4,
               swiglu_limit=1.0, router_aux_loss_coef=0.02, rope_parameters=GPT_OSS_YARN)

VARIANTS = (
    Variant("gpt2_tied", "gpt2", gpt2(0)),
    Variant("gpt2_untied_gelu", "gpt2", gpt2(1, tied=False, activation="gelu")),
    Variant("llama_gqa_untied", "llama", llama(0, rope_parameters=LLAMA3_ROPE)),
    Variant("llama_mha_tied", "llama", llama(1, num_key_value_heads=4, tie_word_embeddings=True)),
    Variant("llama_biased", "llama", llama(3, attention_bias=True, mlp_bias=True)),
    Variant("llama_qkv_biased", "llama", llama(4, attention_bias=True, zero=("o_proj.bias",))),
    Variant("mistral_window", "mistral", hf_model("MistralConfig", "MistralForCausalLM", 2, sliding_window=8),
            legacy=False),
    Variant("mixtral", "mixtral", hf_model("MixtralConfig", "MixtralForCausalLM", 0, num_local_experts=4,
                                           num_experts_per_tok=2, router_aux_loss_coef=0.02, rope_parameters=QWEN_ROPE),
            experts=True),
    # without our record, biased qkv and no window is Llama with attention_bias (o_proj bias zero): the same model
    Variant("qwen2_tied", "qwen2", hf_model("Qwen2Config", "Qwen2ForCausalLM", 5, tie_word_embeddings=True,
                                            rope_parameters=QWEN_ROPE), detected_as="llama"),
    # sliding windows of 4 tokens on layers 2 and 3 only (the 12 test tokens see fewer than all before them)
    Variant("qwen2_untied_window", "qwen2", hf_model("Qwen2Config", "Qwen2ForCausalLM", 6, num_key_value_heads=4,
                                                     use_sliding_window=True, sliding_window=4, max_window_layers=2,
                                                     rope_parameters=QWEN_ROPE), legacy=False),
    # head_dim 24, not hidden / heads = 16: Megatron's kv_channels
    Variant("qwen3_gqa", "qwen3", hf_model("Qwen3Config", "Qwen3ForCausalLM", 7, head_dim=24, rope_parameters=QWEN_ROPE),
            legacy=False),
    Variant("qwen3_mha_tied", "qwen3", hf_model("Qwen3Config", "Qwen3ForCausalLM", 8, head_dim=32, num_key_value_heads=4,
                                                tie_word_embeddings=True, rope_parameters=QWEN_ROPE), legacy=False),
    # experts in layers 1 and 3 (decoder_sparse_step 2), dense MLPs in 0 and 2; top-2 weights as the softmax gave
    # them (norm_topk_prob false); a gated shared expert of 48
    Variant("qwen2_moe_sparse_step", "qwen2_moe", qwen_moe("qwen2_moe", 9, decoder_sparse_step=2, norm_topk_prob=False,
                                                           shared_expert_intermediate_size=48),
            legacy=False, experts=True),
    # 8 experts renormalised, layer 0 dense (mlp_only_layers), no qkv bias, tied, windows of 4 on layers 0 and 2
    Variant("qwen2_moe_window_tied", "qwen2_moe", qwen_moe("qwen2_moe", 10, num_experts=8, mlp_only_layers=[0],
                                                           norm_topk_prob=True, shared_expert_intermediate_size=32,
                                                           qkv_bias=False, tie_word_embeddings=True,
                                                           use_sliding_window=True, sliding_window=4, max_window_layers=4),
            legacy=False, experts=True),
    # head_dim 24, top-2 renormalised, layer 3 dense, biased q/k/v (o_proj bias zero), a window of 4 on every layer
    Variant("qwen3_moe_window", "qwen3_moe", qwen_moe("qwen3_moe", 11, head_dim=24, norm_topk_prob=True,
                                                      mlp_only_layers=[3], attention_bias=True, zero=("o_proj.bias",),
                                                      use_sliding_window=True, sliding_window=4),
            legacy=False, experts=True),
    Variant("deepseek_v3_mla", "deepseek_v3", hf_model("DeepseekV3Config", "DeepseekV3ForCausalLM", 9, q_lora_rank=32,
                                                       rope_parameters=DEEPSEEK_YARN, **MLA), legacy=False),
    # DeepSeekMoE (V3 routing); rotary rows stored as halves (rope_interleave false): permuted to megatron-core's
    # interleaved pairs
    Variant("deepseek_v3_moe_halves_tied", "deepseek_v3", hf_model(
        "DeepseekV3Config", "DeepseekV3ForCausalLM", 10, q_lora_rank=24, rope_interleave=False, tie_word_embeddings=True,
        rope_parameters=QWEN_ROPE, random_buffers=("e_score_correction_bias",), **DEEPSEEK_V3_MOE),
            legacy=False, experts=True, routing=("groups", "scaling", "expert_bias")),
    # DeepSeek-V2-Lite's attention (no query latent: q_proj), DeepSeekMoE with V2's group-limited softmax router
    Variant("deepseek_v2_moe", "deepseek_v2", hf_model("DeepseekV2Config", "DeepseekV2ForCausalLM", 11, q_lora_rank=None,
                                                       rope_parameters=QWEN_ROPE, **DEEPSEEK_V2_MOE),
            legacy=False, experts=True, routing=("softmax_order", "groups", "scaling")),
    # GLM-4.5 (per-head q/k norm, head_dim 24) and GLM-4.5-Air (no q/k norm, every group open, one shared expert)
    Variant("glm4_moe_qk_norm", "glm4_moe", hf_model("Glm4MoeConfig", "Glm4MoeForCausalLM", 14, use_qk_norm=True,
                                                     head_dim=24, random_buffers=("e_score_correction_bias",), **GLM_MOE),
            legacy=False, experts=True, routing=("groups", "scaling", "expert_bias")),
    Variant("glm4_moe_air", "glm4_moe", hf_model("Glm4MoeConfig", "Glm4MoeForCausalLM", 15,
                                                 random_buffers=("e_score_correction_bias",),
                                                 **dict(GLM_MOE, n_group=1, topk_group=1, n_shared_experts=1)),
            legacy=False, experts=True, routing=("scaling", "expert_bias")),
    # Kimi-K2's config (model_type kimi_k2, DeepSeek's own keys) on a dense multi-latent attention model
    Variant("kimi_k2_mla", "deepseek_v3", kimi_k2(17, q_lora_rank=32, rope_parameters=DEEPSEEK_YARN, **MLA),
            legacy=False, model_type="kimi_k2"),
)


# Nemotron-H (hybrid): 8 Mamba-2 heads of 8 channels in 2 groups of 16 state rows, scanned in chunks of 8 (the
# 12 test tokens span two); attention of 4 heads of 16 (2 query groups) without rotary; squared-ReLU MLPs
NEMOTRON_H = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=128, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
                  ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=8)
# experts: 8 of 16 in 2 groups, top-2 from the best group (ranked by its two best biased sigmoid scores),
# renormalised, x 2.5; a shared expert of 48
NEMOTRON_H_MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
                      routed_scaling_factor=2.5, norm_topk_prob=True, moe_shared_expert_intermediate_size=48)


def nemotron_h(seed: int, pattern: str, **config: Any) -> Callable:
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
    return hf_model("NemotronHConfig", "NemotronHForCausalLM", seed, base=NEMOTRON_H,
                    layers_block_type=[kinds[symbol] for symbol in pattern], **config)


VARIANTS = VARIANTS + (
    # attention (4 heads, no query groups), Mamba, Mamba, MLP
    Variant("nemotron_h_hybrid_mha", "nemotron_h", nemotron_h(12, "*MM-", num_key_value_heads=4), legacy=False),
    # expert layers in both pipeline stages (DeepSeek-V3's router, a random expert bias), untied
    Variant("nemotron_h_moe", "nemotron_h", nemotron_h(13, "ME*E", random_buffers=("e_score_correction_bias",),
                                                       **NEMOTRON_H_MOE),
            legacy=False, experts=True, routing=("groups", "scaling", "expert_bias")),
    # gpt-oss: attention sinks, windows of 4 on layers 0 and 2, YaRN (factor 4 of a 32-token context, correction
    # range not rounded), biased router and experts, clamp 1.0 (hit by the tiny model's activations), head_dim 24.
    # The experts' down_proj biases are zero: megatron-core 0.16.1 adds them once per expert-TP rank, and the kit
    # runs it at TP2 (tests/test_gpt_oss.py proves them at TP1 and EP2, and shows that miscount)
    Variant("gpt_oss_window_yarn", "gpt_oss", hf_model("GptOssConfig", "GptOssForCausalLM", 12, zero=("down_proj_bias",),
                                                       **GPT_OSS), legacy=False, experts=True),
)


# ---- multi-tower (vision-language) families: the kit converts them through a Megatron layout that holds their towers
# and compares the Hugging Face model's logits on the family's fixed image+text input (``FamilySpec.logits_inputs``)

@dataclass(frozen=True)
class TowerVariant:
    """One tiny multi-tower model. ``layout``: the flags writing it in a Megatron layout that holds its towers, at
    TP2 and two pipeline ranks; ``read``: the flags reading that layout back (given the Hugging Face directory)."""

    name: str
    family: str
    build: Callable[[Path], Path]
    layout: tuple[str, ...]
    read: Callable[[Path], tuple[str, ...]] = lambda source: ()


INTERNVL_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)
# InternViT-300M (InternVL 3 / 2.5 small sizes): LayerNorm, biased qkv; InternViT-6B: RMSNorm, qk norm, no qkv bias
INTERNVIT = {"qwen2": dict(norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
             "llama": dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True)}


def tiny_internvl(path: Path, text: str = "qwen2", tie: bool = False, vocab: int = 128, **vision: Any) -> Path:
    """A random InternVL: 2 vision layers of width 32 (4 heads) on 16 x 16 images of 4 x 4 patches (4 image tokens
    after the pixel shuffle), a 4-layer language model; every tensor moved off its initial value (a lost tensor shows)."""
    import transformers
    torch.manual_seed(0)
    config = transformers.InternVLConfig(
        text_config=dict(INTERNVL_TEXT, model_type=text, tie_word_embeddings=tie, vocab_size=vocab),
        vision_config={**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              image_size=16, patch_size=4), **INTERNVIT[text], **vision},
        image_token_id=100, image_seq_length=4, tie_word_embeddings=tie)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    return path


# the vision tower over both pipeline ranks (its projector on the second), the language model 3,1
MINDSPEED_MM = ("--megatron_format", "mindspeed_mm", "--target_tensor_model_parallel_size", "2",
                "--target_pipeline_layers", "3,1", "--vision_pipeline_layers", "1,1")


def _hf_config_dir(source: Path) -> tuple[str, ...]:
    return ("--hf_config_dir", str(source))


def _qwen_vl(family: str, tie: bool = False) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        from tests.test_qwen2_vl import tiny_vl
        return tiny_vl(family, path, tie=tie)
    return build


def _llava(text: str, tie: bool = False) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        from tests.llava_helpers import tiny_llava
        return tiny_llava(path, text=text, tie=tie, feature_layer=-1)  # -2 drops a layer: tests/test_llava.py
    return build


# megatron-core's LLaVA layout in rank files at TP2 x PP2 (the towers on the first stage)
MCORE_LLAVA = ("--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2")
MEGATRON_BRIDGE = ("--megatron_bridge",)

TOWER_VARIANTS = (
    TowerVariant("internvl_qwen2_tied", "internvl", lambda path: tiny_internvl(path, "qwen2", tie=True), MINDSPEED_MM,
                 _hf_config_dir),
    TowerVariant("internvl_llama_qk_norm", "internvl", lambda path: tiny_internvl(path, "llama"), MINDSPEED_MM,
                 _hf_config_dir),
    TowerVariant("qwen2_5_vl_mindspeed_mm", "qwen2_5_vl", _qwen_vl("qwen2_5_vl"), MINDSPEED_MM, _hf_config_dir),
    TowerVariant("qwen2_5_vl_bridge_tied", "qwen2_5_vl", _qwen_vl("qwen2_5_vl", tie=True), MEGATRON_BRIDGE),
    TowerVariant("qwen2_vl_mindspeed_mm_tied", "qwen2_vl", _qwen_vl("qwen2_vl", tie=True), MINDSPEED_MM,
                 _hf_config_dir),
    TowerVariant("llava_llama", "llava", _llava("llama"), MCORE_LLAVA),
    TowerVariant("llava_qwen2_tied", "llava", _llava("qwen2", tie=True), MCORE_LLAVA),
    # InternViT-300M-shaped (LayerNorm, biased qkv, layer scale) as megatron-core's internvit300M: tests/test_internvl_mcore.py
    TowerVariant("internvl_qwen2_mcore_llava", "internvl", lambda path: tiny_internvl(path, "qwen2"), MCORE_LLAVA),
)
