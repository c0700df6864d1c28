"""Tiny GPT-2 checkpoints written the way Megatron-LM lays them out, for demos, tests and bug reports.

This writer deliberately does not use the family table or the core's QKV packing: it builds each
rank's tensors head by head from the Hugging Face weights for every checkpoint version (0, 1.0,
2.0+) and key schema, so a mapping bug in the converter cannot cancel out against it.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import torch


def random_weight(name: str, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A weight with a realistic scale: norms near 1, biases near 0, matrices scaled by their fan-in."""
    if len(shape) == 1:
        base = 1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0
        return base + 0.2 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(shape[-1]) * 1.5


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with a realistic scale: default inits give near-zero logits that hide mapping bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_weight(name, param.shape, generator))
    return model


def tiny_gpt2(path: Path | None, tied: bool = True, vocab: int = 1000, layers: int = 4, activation: str = "gelu_new",
              seed: int = 0):
    """A tiny random GPT2LMHeadModel (hidden 64, 4 heads), saved to ``path`` when given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=vocab, n_positions=64,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied, activation_function=activation)
    model = randomize(GPT2LMHeadModel(config), seed).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def _qkv_rows_for_rank(c_attn: torch.Tensor, heads: int, rank: int, tp: int, version: float) -> torch.Tensor:
    """One TP rank's fused QKV rows from a Conv1D c_attn ([h, 3h] weight or [3h] bias), per version."""
    hidden = c_attn.shape[-1] // 3
    head_dim = hidden // heads
    linear = c_attn.t() if c_attn.dim() == 2 else c_attn  # rows: all q, all k, all v
    q, k, v = linear[:hidden], linear[hidden:2 * hidden], linear[2 * hidden:]
    local = range(rank * heads // tp, (rank + 1) * heads // tp)
    rows = lambda part, h: part[h * head_dim:(h + 1) * head_dim]  # noqa: E731
    if version >= 2.0:  # (heads, 3, head_dim)
        return torch.cat([torch.cat([rows(q, h), rows(k, h), rows(v, h)]) for h in local])
    if version >= 1.0:  # (heads, head_dim, 3)
        return torch.cat([torch.stack([rows(q, h), rows(k, h), rows(v, h)], dim=1).reshape(-1, *linear.shape[1:])
                          for h in local])
    return torch.cat([torch.cat([rows(part, h) for h in local]) for part in (q, k, v)])  # (3, heads, head_dim)


def _shard(tensor: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    size = tensor.shape[dim] // tp
    return tensor.narrow(dim, rank * size, size).clone()


def reference_megatron_gpt2(model, out: Path, tp: int = 1, pp: int = 1, version: float = 3.0,
                            schema: str = "legacy", stages: list[int] | None = None, iteration: int | None = None,
                            divisible_by: int = 128, old_names: bool = False) -> Path:
    """Write ``model`` (HF GPT-2) as a Megatron tree the way Megatron-LM lays it out."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    stages = stages or [cfg.n_layer // pp] * pp
    multiple = divisible_by * tp
    padded = int(math.ceil(cfg.vocab_size / multiple) * multiple)
    wte = sd["transformer.wte.weight"]
    wte = torch.cat([wte, wte[-1:].expand(padded - cfg.vocab_size, -1)])
    untied = not cfg.tie_word_embeddings
    args = argparse.Namespace(
        num_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head, ffn_hidden_size=4 * cfg.n_embd,
        max_position_embeddings=cfg.n_positions, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        padded_vocab_size=padded, orig_vocab_size=cfg.vocab_size, layernorm_epsilon=cfg.layer_norm_epsilon,
        openai_gelu=cfg.activation_function == "gelu_new", bias_gelu_fusion=cfg.activation_function == "gelu_fast",
        untie_embeddings_and_output_weights=untied, params_dtype=torch.float32, add_bias_linear=True)
    iter_name = "release" if iteration is None else f"iter_{iteration:07d}"
    first_layer = 0
    for stage, count in enumerate(stages):
        for rank in range(tp):
            layers = {}
            for local in range(count):
                layers.update(_reference_layer(sd, first_layer + local, local, rank, tp, cfg.n_head, version,
                                               schema, old_names))
            model_sd = _reference_stage(sd, wte, padded, layers, stage, len(stages), rank, tp, schema, untied, old_names)
            name = f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
            os.makedirs(out / iter_name / name, exist_ok=True)
            torch.save({"args": args, "checkpoint_version": version, "iteration": iteration or 0, "model": model_sd},
                       out / iter_name / name / "model_optim_rng.pt")
        first_layer += count
    (out / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    return out


def _reference_layer(sd, layer, local, rank, tp, heads, version, schema, old_names):
    hf = lambda name: sd[f"transformer.h.{layer}.{name}"]  # noqa: E731
    qkv_w = _qkv_rows_for_rank(hf("attn.c_attn.weight"), heads, rank, tp, version)
    qkv_b = _qkv_rows_for_rank(hf("attn.c_attn.bias"), heads, rank, tp, version)
    fc1_w = _shard(hf("mlp.c_fc.weight").t(), 0, rank, tp)
    fc1_b = _shard(hf("mlp.c_fc.bias"), 0, rank, tp)
    if schema == "legacy":
        attention = "attention" if old_names else "self_attention"
        ln1, ln2 = ("input_norm", "post_attention_norm") if old_names else ("input_layernorm", "post_attention_layernorm")
        names = {f"{ln1}.weight": hf("ln_1.weight"), f"{ln1}.bias": hf("ln_1.bias"),
                 f"{attention}.query_key_value.weight": qkv_w, f"{attention}.query_key_value.bias": qkv_b,
                 f"{attention}.dense.weight": _shard(hf("attn.c_proj.weight").t(), 1, rank, tp),
                 f"{attention}.dense.bias": hf("attn.c_proj.bias"),
                 f"{ln2}.weight": hf("ln_2.weight"), f"{ln2}.bias": hf("ln_2.bias"),
                 "mlp.dense_h_to_4h.weight": fc1_w, "mlp.dense_h_to_4h.bias": fc1_b,
                 "mlp.dense_4h_to_h.weight": _shard(hf("mlp.c_proj.weight").t(), 1, rank, tp),
                 "mlp.dense_4h_to_h.bias": hf("mlp.c_proj.bias")}
        return {f"layers.{local}.{k}": v.clone() for k, v in names.items()}
    te = schema == "transformer_engine"
    ln1 = "self_attention.linear_qkv.layer_norm_" if te else "input_layernorm."
    ln2 = "mlp.linear_fc1.layer_norm_" if te else "pre_mlp_layernorm."
    names = {f"{ln1}weight": hf("ln_1.weight"), f"{ln1}bias": hf("ln_1.bias"),
             "self_attention.linear_qkv.weight": qkv_w, "self_attention.linear_qkv.bias": qkv_b,
             "self_attention.linear_qkv._extra_state": None,
             "self_attention.linear_proj.weight": _shard(hf("attn.c_proj.weight").t(), 1, rank, tp),
             "self_attention.linear_proj.bias": hf("attn.c_proj.bias"),
             f"{ln2}weight": hf("ln_2.weight"), f"{ln2}bias": hf("ln_2.bias"),
             "mlp.linear_fc1.weight": fc1_w, "mlp.linear_fc1.bias": fc1_b,
             "mlp.linear_fc2.weight": _shard(hf("mlp.c_proj.weight").t(), 1, rank, tp),
             "mlp.linear_fc2.bias": hf("mlp.c_proj.bias")}
    return {f"decoder.layers.{local}.{k}": (v.clone() if v is not None else None) for k, v in names.items()}


def _reference_stage(sd, wte, padded, layers, stage, num_stages, rank, tp, schema, untied, old_names):
    first, last = stage == 0, stage == num_stages - 1
    emb = _shard(wte, 0, rank, tp)
    out_w = None
    if untied:
        lm = sd["lm_head.weight"]
        out_w = _shard(torch.cat([lm, lm[-1:].expand(padded - lm.shape[0], -1)]), 0, rank, tp)
    if schema == "legacy":
        encoder = dict(layers)
        if last:
            norm = "final_norm" if old_names else "final_layernorm"
            encoder.update({f"{norm}.weight": sd["transformer.ln_f.weight"].clone(),
                            f"{norm}.bias": sd["transformer.ln_f.bias"].clone()})
        lm = {"transformer" if old_names else "encoder": encoder}
        if first:
            lm["embedding"] = {"word_embeddings": {"weight": emb},
                               "position_embeddings": {"weight": sd["transformer.wpe.weight"].clone()}}
        result = {"language_model": lm}
        if last and untied:
            lm["output_layer"] = {"weight": out_w}
        if last and not first and not untied:
            result["word_embeddings_for_head"] = {"weight": emb}
        return result
    result = dict(layers)
    if first:
        result["embedding.word_embeddings.weight"] = emb
        result["embedding.position_embeddings.weight"] = sd["transformer.wpe.weight"].clone()
    if last:
        result["decoder.final_layernorm.weight"] = sd["transformer.ln_f.weight"].clone()
        result["decoder.final_layernorm.bias"] = sd["transformer.ln_f.bias"].clone()
        if untied or not first:
            result["output_layer.weight"] = out_w if untied else emb
    return result
