#!/usr/bin/env python
"""Benchmark: conversion and verify time and peak memory, measured side by side with `cp -r` in one run.

Builds synthetic bf16 checkpoints (Llama-shaped, and Mixtral-shaped for expert parallel) of the
requested sizes; the largest tensor (the embedding, 125 MB) stays the same as the size grows, only
the layer count changes. Then a model of real shapes: Llama-3-8B's layers and vocab (hidden 4096,
ffn 14336, 32/8 heads, vocab 128256: a 1.05 GB embedding), ``--real_shapes_layers`` layers (16:
9.1 GB); ``--only_real_shapes`` runs only its rows. Every measurement runs in its own child
process; peak RSS comes from that child's ``wait4`` resource usage. Each step runs ``--repeats``
times (output removed in between); the table shows the median time, so one step caught by a slow
moment of the disk or page cache does not set its ratio. Rows:
  cp -r                     copying the HF source tree (the disk's own speed); every conversion
                            is also paired with `cp -r` of its own source, run just before it in
                            each round, and its ratio is taken against that
  python -c 'import torch'  interpreter start-up, part of every conversion
  import only               a process importing what the tool imports (start-up RSS)
  hf->megatron tp2pp2, megatron tp2pp2->hf, tp2pp2->tp1pp1, hf->torch_dist, torch_dist->hf,
  mixtral ep2->hf           the tool
  verify of ...             scripts/verify.py of that conversion's source and output, run right
                            after the conversion in each round; its ratio is to that conversion
  naive tp2pp2->hf          the same conversion with every source file loaded fully and the
                            output assembled in memory before saving (what most converters do)
  deepseek fp8 ...          ``--deepseek_layers N``: a DeepSeek-V3-shaped model (MLA, dense layers of its
                            real shapes, FP8 blocks as shipped, embedding 1.85 GB) converted to bf16
                            Megatron TP2 and back, in bf16 and (``fp8``) block-quantized again as shipped;
                            ``report`` then checks its memory budget too
  gpt-oss mxfp4 ...         ``--gpt_oss_layers N``: a gpt-oss-20b-shaped model (32 experts of 2880, MXFP4
                            experts as released, bf16 embedding 1.16 GB) converted to bf16 Megatron TP2 and back

``--nproc 1,2`` measures instead how a conversion scales with processes: for each model size, four
conversions (HF -> TP2 PP2, TP2 PP2 -> HF, HF -> torch_dist, torch_dist -> HF; HF output in 1 GB shards, so
there are shards to share), each run in every round with one plain process and under ``torchrun
--standalone --nproc-per-node N`` for every other N, right after `cp -r` of its source; and torchrun's own
start-up (an empty script). Peak RSS is the largest of any one process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

import _bootstrap  # noqa: F401

import torch
from transformers import LlamaConfig, MixtralConfig

from checkpoint_convert.commands.cli import add_flag, guarded
from checkpoint_convert.formats.hf_io import SafetensorsStreamWriter
from checkpoint_convert.base.runtime import exit_now

REPO = Path(__file__).resolve().parents[1]


class Shapes(NamedTuple):
    """A Llama-shaped model's sizes (bf16): what sets its largest tensor, the embedding."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int

    @property
    def largest_mb(self) -> float:
        return self.vocab * self.hidden * 2 / 2**20


SIZED = Shapes(hidden=2048, ffn=5632, heads=16, groups=4, vocab=32000)  # --sizes: layers added to reach a size
LLAMA3_8B = Shapes(hidden=4096, ffn=14336, heads=32, groups=8, vocab=128256)  # the real-shapes model
DEEPSEEK_V3 = Shapes(hidden=7168, ffn=18432, heads=128, groups=128, vocab=129280)  # its dense layers, FP8 as shipped
GPT_OSS_20B = Shapes(hidden=2880, ffn=2880, heads=64, groups=8, vocab=201088)  # per expert; head_dim 64, 32 experts
GPT_OSS_EXPERTS, GPT_OSS_HEAD_DIM = 32, 64
# DeepSeek-V3's multi-latent attention: q_lora_rank, kv_lora_rank, nope / rope / value head sizes
DEEPSEEK_MLA = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def _layer_shapes(shapes: Shapes, experts: int) -> dict[str, tuple[int, ...]]:
    hidden, ffn = shapes.hidden, shapes.ffn
    kv = hidden // shapes.heads * shapes.groups
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden)}
    if experts:
        ffn //= experts
        layer.update({"mlp.gate.weight": (experts, hidden), "mlp.experts.gate_up_proj": (experts, 2 * ffn, hidden),
                      "mlp.experts.down_proj": (experts, hidden, ffn)})
    else:
        layer.update({"mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                      "mlp.down_proj.weight": (hidden, ffn)})
    return layer


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def layers_for_size(gigabytes: float, shapes: Shapes, experts: int = 0) -> int:
    """The even layer count (for PP=2) that brings a bf16 model of these shapes nearest to ``gigabytes``."""
    layer_bytes = sum(_numel(s) for s in _layer_shapes(shapes, experts).values()) * 2
    fixed_bytes = (2 * shapes.vocab * shapes.hidden + shapes.hidden) * 2
    return max(2, 2 * round((gigabytes * 1e9 - fixed_bytes) / layer_bytes / 2))


def build_synthetic(path: Path, shapes: Shapes, layers: int, experts: int = 0) -> None:
    """A bf16 HF checkpoint (untied embeddings); tensors are generated one at a time."""
    entries = [("model.embed_tokens.weight", (shapes.vocab, shapes.hidden)), ("model.norm.weight", (shapes.hidden,)),
               ("lm_head.weight", (shapes.vocab, shapes.hidden))]
    entries += [(f"model.layers.{i}.{name}", shape) for i in range(layers)
                for name, shape in _layer_shapes(shapes, experts).items()]
    path.mkdir(parents=True)
    writer = SafetensorsStreamWriter(path / "model.safetensors", [(n, s, torch.bfloat16) for n, s in entries])
    generator = torch.Generator().manual_seed(0)
    for name, shape in entries:
        writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    common = dict(vocab_size=shapes.vocab, hidden_size=shapes.hidden, num_hidden_layers=layers,
                  num_attention_heads=shapes.heads, num_key_value_heads=shapes.groups, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    config = (MixtralConfig(intermediate_size=shapes.ffn // experts, num_local_experts=experts, num_experts_per_tok=2,
                            **common)
              if experts else LlamaConfig(intermediate_size=shapes.ffn, **common))
    config.save_pretrained(path)


def _deepseek_layer_shapes(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """A dense DeepSeek-V3 layer (multi-latent attention, SwiGLU MLP) of real shapes."""
    mla, hidden, heads = DEEPSEEK_MLA, shapes.hidden, shapes.heads
    q_head = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
    return {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_a_proj.weight": (mla["q_lora_rank"], hidden),
            "self_attn.q_a_layernorm.weight": (mla["q_lora_rank"],),
            "self_attn.q_b_proj.weight": (heads * q_head, mla["q_lora_rank"]),
            "self_attn.kv_a_proj_with_mqa.weight": (mla["kv_lora_rank"] + mla["qk_rope_head_dim"], hidden),
            "self_attn.kv_a_layernorm.weight": (mla["kv_lora_rank"],),
            "self_attn.kv_b_proj.weight": (heads * (mla["qk_nope_head_dim"] + mla["v_head_dim"]), mla["kv_lora_rank"]),
            "self_attn.o_proj.weight": (hidden, heads * mla["v_head_dim"]),
            "mlp.gate_proj.weight": (shapes.ffn, hidden), "mlp.up_proj.weight": (shapes.ffn, hidden),
            "mlp.down_proj.weight": (hidden, shapes.ffn)}


def build_synthetic_deepseek(path: Path, shapes: Shapes, layers: int) -> None:
    """A DeepSeek-V3-shaped checkpoint stored as DeepSeek ships it: 2-D layer weights in FP8 (E4M3) with a float32
    scale per 128 x 128 block (``weight_scale_inv``), everything else bf16; one safetensors shard per layer."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config

    path.mkdir(parents=True)
    generator, weight_map = torch.Generator().manual_seed(0), {}
    shards = [{"model.embed_tokens.weight": (shapes.vocab, shapes.hidden), "model.norm.weight": (shapes.hidden,),
               "lm_head.weight": (shapes.vocab, shapes.hidden)}]
    shards += [{f"model.layers.{i}.{name}": shape for name, shape in _deepseek_layer_shapes(shapes).items()}
               for i in range(layers)]
    for index, shard in enumerate(shards):
        tensors = {}
        for name, shape in shard.items():
            weight = torch.randn(shape, generator=generator) * 0.02
            if ".layers." in name and len(shape) == 2:
                grid = [-(-size // 128) for size in shape]
                tensors[name] = (weight * 448 / 0.1).clamp(-448, 448).to(torch.float8_e4m3fn)
                tensors[name + "_scale_inv"] = torch.full(grid, 0.1 / 448)
            else:
                tensors[name] = weight.to(torch.bfloat16)
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    DeepseekV3Config(vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.ffn,
                     num_hidden_layers=layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.heads,
                     first_k_dense_replace=layers, max_position_embeddings=4096, tie_word_embeddings=False,
                     quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}, **DEEPSEEK_MLA).save_pretrained(path)


def _gpt_oss_layer(shapes: Shapes, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One gpt-oss layer of real shapes as released: attention, sinks, router in bf16; experts' gate_up_proj
    [32, 2 x 2880 out, 2880 in] and down_proj in MXFP4 blocks and scales (out features, in / 32 groups, 16 bytes)."""
    hidden, q, kv, experts = shapes.hidden, shapes.heads * GPT_OSS_HEAD_DIM, shapes.groups * GPT_OSS_HEAD_DIM, GPT_OSS_EXPERTS
    dense = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (q, hidden), "self_attn.q_proj.bias": (q,),
             "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
             "self_attn.o_proj.weight": (hidden, q), "self_attn.o_proj.bias": (hidden,),
             "self_attn.sinks": (shapes.heads,), "mlp.router.weight": (experts, hidden), "mlp.router.bias": (experts,),
             "mlp.experts.gate_up_proj_bias": (experts, 2 * shapes.ffn), "mlp.experts.down_proj_bias": (experts, hidden)}
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in dense.items()}
    for name, rows, columns in (("gate_up_proj", 2 * shapes.ffn, hidden), ("down_proj", hidden, shapes.ffn)):
        tensors[f"mlp.experts.{name}_blocks"] = torch.randint(0, 256, (experts, rows, columns // 32, 16),
                                                              dtype=torch.uint8, generator=generator)
        tensors[f"mlp.experts.{name}_scales"] = torch.randint(118, 124, (experts, rows, columns // 32),
                                                              dtype=torch.uint8, generator=generator)
    return tensors


def build_synthetic_gpt_oss(path: Path, shapes: Shapes, layers: int) -> None:
    """A gpt-oss-20b-shaped checkpoint stored as OpenAI released it (experts in MXFP4); one shard per layer."""
    from safetensors.torch import save_file
    from transformers import GptOssConfig

    path.mkdir(parents=True)
    generator, weight_map = torch.Generator().manual_seed(0), {}
    for index in range(layers + 1):
        if index == 0:
            tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in
                       (("model.embed_tokens.weight", (shapes.vocab, shapes.hidden)),
                        ("model.norm.weight", (shapes.hidden,)), ("lm_head.weight", (shapes.vocab, shapes.hidden)))}
        else:
            tensors = {f"model.layers.{index - 1}.{name}": tensor
                       for name, tensor in _gpt_oss_layer(shapes, generator).items()}
        file = f"model-{index + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    GptOssConfig(vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.ffn,
                 num_hidden_layers=layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.groups,
                 head_dim=GPT_OSS_HEAD_DIM, num_local_experts=GPT_OSS_EXPERTS,
                 quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                     "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
                 ).save_pretrained(path)


# Runs one command and prints its wall time and peak RSS. It is started as a small process of its own
# because on Linux a child's ru_maxrss starts from the RSS of the process that forked it, and this
# benchmark's own process holds torch and the synthetic tensors.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status),
                  usage.ru_utime + usage.ru_stime]))
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process (see :func:`measure_cpu`)."""
    return measure_cpu(command)[:2]


def measure_cpu(command: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds: user + system) of one child process and those it waited for.

    Every step starts with no dirty pages pending: earlier steps' gigabytes of output still being
    flushed to disk would otherwise throttle this step's writes (``balance_dirty_pages``) by an amount
    that depends on the order of the steps.
    """
    os.sync()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, check=True)
    seconds, rss, code, cpu = json.loads(result.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(command)}")
    return seconds, rss, cpu


def _convert(source: Path, target: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "convert.py"), "--load_path", str(source), "--save_path",
            str(target), "--quiet", *flags]


# What a conversion imports: the core, and for Hugging Face configs and the plan check, transformers'
# config and model classes of the family.
IMPORT_ONLY = """
import sys; sys.path[:0] = [{repo!r}, {scripts!r}]
import _bootstrap, checkpoint_convert.converter, accelerate
from checkpoint_convert.base.runtime import exit_now, transformers_attr
for name in ("LlamaConfig", "LlamaForCausalLM", "MixtralConfig", "MixtralForCausalLM", "GenerationConfig"):
    transformers_attr(name)
exit_now(0)
"""

NAIVE = """
import sys; sys.path[:0] = [{repo!r}, {scripts!r}]
import _bootstrap, functools, torch
from safetensors.torch import save_file
from checkpoint_convert.run import converter
from checkpoint_convert.formats import megatron_io, safe_load, hf_io
full_load = functools.partial(safe_load.safe_torch_load, lazy=False)
megatron_io.safe_torch_load = full_load
class InMemory:
    def __init__(self, root, planned, *args): self.root, self.tensors = root, {{}}
    def write(self, name, tensor): self.tensors[name] = tensor.clone()
    def finish(self): save_file(self.tensors, str(self.root / "model.safetensors"), metadata={{"format": "pt"}})
converter.HFWriter = InMemory
tree_init = megatron_io.MegatronTree.__init__
def eager_init(self, *a, **k):
    tree_init(self, *a, **k)
    for rank in self.files: self._flat(rank)
megatron_io.MegatronTree.__init__ = eager_init
converter.convert(converter.Options(load_path=__import__("pathlib").Path({source!r}),
                  save_path=__import__("pathlib").Path({target!r}), to="hf", quiet=True))
"""


class Row(NamedTuple):
    name: str
    seconds: float  # median
    peak_mb: float  # highest
    copy_seconds: float | None  # median of `cp -r` of the step's source, measured before it in each round
    per_conversion: float | None = None  # verify rows: median over rounds of (verify / its conversion in that round)


class Steps:
    """Runs steps ``repeats`` times each and keeps their rows.

    A conversion's ratio is taken against ``cp -r`` of its own source, measured right before it in
    each round: ``cp -r`` of a cached tree takes 0.7 s or 3 s depending on what the page cache holds,
    and a conversion run minutes after its baseline would see another cache. ``verify`` of a
    conversion's source and output runs right after the conversion in each round, so both see the
    same machine and cache, and its ratio is taken against that conversion.
    """

    def __init__(self, work: Path, repeats: int) -> None:
        self.work, self.repeats, self.rows = work, repeats, []

    def timed(self, command: list[str], output: Path | None = None) -> tuple[float, float]:
        if output is not None:
            shutil.rmtree(output, ignore_errors=True)
        return measure(command)

    def _copy(self, source: Path) -> float:
        return self.timed(["cp", "-r", str(source), str(self.work / "copy")], self.work / "copy")[0]

    def row(self, name: str, command: list[str], output: Path | None = None, source: Path | None = None) -> None:
        runs, copies = [], []
        for _ in range(self.repeats):
            if source is not None:
                copies.append(self._copy(source))
            runs.append(self.timed(command, output))
        shutil.rmtree(self.work / "copy", ignore_errors=True)
        self.rows.append(Row(name, statistics.median(s for s, _ in runs), max(rss for _, rss in runs),
                             statistics.median(copies) if copies else None))

    def conversion(self, name: str, source: Path, target: Path, *flags: str) -> None:
        """A conversion paired with `cp -r` of its source, then `verify` of its source and output, in each round."""
        runs, copies, checks = [], [], []
        for _ in range(self.repeats):
            copies.append(self._copy(source))
            runs.append(self.timed(_convert(source, target, *flags), target))
            checks.append(self.timed([sys.executable, str(REPO / "scripts" / "verify.py"), str(source), str(target)]))
        shutil.rmtree(self.work / "copy", ignore_errors=True)
        self.rows.append(Row(name, statistics.median(s for s, _ in runs), max(rss for _, rss in runs),
                             statistics.median(copies)))
        self.rows.append(Row(f"verify of {name}", statistics.median(s for s, _ in checks),
                             max(rss for _, rss in checks), None,
                             statistics.median(check[0] / run[0] for check, run in zip(checks, runs))))


def _baselines_and_round_trip(steps: Steps, hf: Path, work: Path) -> None:
    """Rows every model has: the baselines, HF -> TP2 PP2 and back, and TP2 PP2 -> TP1 PP1."""
    steps.row("cp -r (HF source)", ["cp", "-r", str(hf), str(work / "copy")], output=work / "copy")
    steps.row("python -c 'import torch'", [sys.executable, "-c", "import torch"])
    steps.row("import only", [sys.executable, "-c", IMPORT_ONLY.format(repo=str(REPO), scripts=str(REPO / "scripts"))])
    steps.conversion("hf -> megatron tp2pp2", hf, work / "tp2pp2", "--to", "megatron",
                     "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2")
    steps.conversion("megatron tp2pp2 -> hf", work / "tp2pp2", work / "back", "--to", "hf")
    shutil.rmtree(work / "back")
    steps.conversion("megatron tp2pp2 -> tp1pp1", work / "tp2pp2", work / "tp1", "--to", "megatron",
                     "--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "1")
    shutil.rmtree(work / "tp1")


def run_size(work: Path, gigabytes: float, repeats: int) -> list[Row]:
    """The rows of one model size (``SIZED`` shapes, layers added to reach the size)."""
    hf, mixtral = work / "hf", work / "mixtral_hf"
    build_synthetic(hf, SIZED, layers_for_size(gigabytes, SIZED))
    build_synthetic(mixtral, SIZED, layers_for_size(gigabytes, SIZED, experts=4), experts=4)
    steps = Steps(work, repeats)
    _baselines_and_round_trip(steps, hf, work)
    steps.conversion("hf -> megatron torch_dist", hf, work / "dist", "--to", "megatron",
                     "--megatron_ckpt_format", "torch_dist")
    steps.conversion("megatron torch_dist -> hf", work / "dist", work / "dist_back", "--to", "hf")
    subprocess.run(_convert(mixtral, work / "ep2", "--to", "megatron", "--target_expert_model_parallel_size", "2"),
                   check=True)
    steps.conversion("mixtral megatron ep2 -> hf", work / "ep2", work / "mixtral_back", "--to", "hf")
    naive = NAIVE.format(repo=str(REPO), scripts=str(REPO / "scripts"), source=str(work / "tp2pp2"),
                         target=str(work / "naive"))
    steps.row("naive megatron tp2pp2 -> hf", [sys.executable, "-c", naive], output=work / "naive",
              source=work / "tp2pp2")
    return steps.rows


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
# (name, source: the HF model or a tree built from it, flags); HF output in shards processes can share
PROCESS_CASES = (
    ("hf -> megatron tp2pp2", "hf", ("--to", "megatron", "--target_tensor_model_parallel_size", "2",
                                     "--target_pipeline_model_parallel_size", "2")),
    ("megatron tp2pp2 -> hf", "tp2pp2", ("--to", "hf", "--max_shard_size", "1GB")),
    ("hf -> megatron torch_dist", "hf", ("--to", "megatron", "--megatron_ckpt_format", "torch_dist")),
    ("megatron torch_dist -> hf", "dist", ("--to", "hf", "--max_shard_size", "1GB")),
)


class ProcessRow(NamedTuple):
    name: str
    copy_seconds: float  # median of `cp -r` of its source, measured before it in each round
    seconds: dict[int, float]  # processes -> median wall time
    cpu_seconds: dict[int, float]  # processes -> median CPU time of all of them (and torchrun's)
    peak_mb: dict[int, float]  # processes -> highest peak RSS of one process


def _launched(processes: int, source: Path, target: Path, *flags: str) -> list[str]:
    """The conversion in one plain process, or under torchrun in ``processes`` processes."""
    command = _convert(source, target, *flags)
    return command if processes == 1 else TORCHRUN + [str(processes)] + command[1:]


def run_processes(work: Path, gigabytes: float, counts: list[int],
                  repeats: int) -> tuple[list[ProcessRow], dict[str, float]]:
    """Each of ``PROCESS_CASES`` at every process count, side by side in each round; and torchrun's start-up."""
    hf = work / "hf"
    build_synthetic(hf, SIZED, layers_for_size(gigabytes, SIZED))
    for tree, flags in (("tp2pp2", PROCESS_CASES[0][2]), ("dist", PROCESS_CASES[2][2])):
        subprocess.run(_convert(hf, work / tree, *flags), check=True)
    steps, rows = Steps(work, repeats), []
    (work / "empty.py").write_text("")
    startup = {"torchrun": statistics.median(measure(TORCHRUN + [str(max(counts)), str(work / "empty.py")])[0]
                                             for _ in range(repeats)),
               "import": statistics.median(measure([sys.executable, "-c", IMPORT_ONLY.format(
                   repo=str(REPO), scripts=str(REPO / "scripts"))])[0] for _ in range(repeats))}
    for name, source, flags in PROCESS_CASES:
        copies, runs = [], {count: [] for count in counts}
        for _ in range(repeats):
            copies.append(steps._copy(work / source))
            for count in counts:
                shutil.rmtree(work / "out", ignore_errors=True)
                runs[count].append(measure_cpu(_launched(count, work / source, work / "out", *flags)))
        rows.append(ProcessRow(name, statistics.median(copies),
                               {count: statistics.median(run[0] for run in times) for count, times in runs.items()},
                               {count: statistics.median(run[2] for run in times) for count, times in runs.items()},
                               {count: max(run[1] for run in times) for count, times in runs.items()}))
    shutil.rmtree(work / "copy", ignore_errors=True)
    return rows, startup


def report_processes(title: str, rows: list[ProcessRow], startup: dict[str, float]) -> None:
    counts = sorted(rows[0].seconds)
    print(f"\n## {title}: wall seconds (and CPU seconds of all processes) by processes; 1: one plain process, more: "
          f"torchrun --standalone. Start-up: the tool's imports {startup['import']:.1f} s; torchrun of an empty "
          f"script, {max(counts)} processes, {startup['torchrun']:.1f} s")
    print("| conversion | cp -r of its source | " + " | ".join(f"{n} proc. s (CPU s)" for n in counts)
          + " | " + " | ".join(f"speed-up at {n}" for n in counts[1:]) + " | peak RSS MB per process |")
    print("| --- | ---: | " + " | ".join("---:" for _ in counts) + " | " + " | ".join("---:" for _ in counts[1:])
          + " | ---: |")
    for row in rows:
        base = row.seconds[counts[0]]
        print(f"| {row.name} | {row.copy_seconds:.1f} | "
              + " | ".join(f"{row.seconds[n]:.1f} ({row.cpu_seconds[n]:.1f})" for n in counts)
              + " | " + " | ".join(f"{base / row.seconds[n]:.2f}" for n in counts[1:]) + " | "
              + " / ".join(f"{row.peak_mb[n]:.0f}" for n in counts) + " |")


def run_real_shapes(work: Path, layers: int, repeats: int) -> list[Row]:
    """The rows of a model of Llama-3-8B's layer and vocab shapes (largest tensor 1 GB), ``layers`` layers."""
    hf = work / "hf"
    build_synthetic(hf, LLAMA3_8B, layers)
    steps = Steps(work, repeats)
    _baselines_and_round_trip(steps, hf, work)
    return steps.rows


def _dequantizing_rows(work: Path, family: str, quantization: str, build, repeats: int,
                       fp8_back: bool = False) -> list[Row]:
    """The rows of a quantized source ``build(path)`` writes: converted to bf16 Megatron TP2 (dequantized while
    streaming) and back, and with ``fp8_back`` also back to block-quantized FP8 as shipped."""
    hf = work / "hf"
    build(hf)
    steps = Steps(work, repeats)
    steps.row("python -c 'import torch'", [sys.executable, "-c", "import torch"])
    steps.row("import only", [sys.executable, "-c", IMPORT_ONLY.format(repo=str(REPO), scripts=str(REPO / "scripts"))])
    steps.conversion(f"{family} {quantization} hf -> megatron tp2 (bf16)", hf, work / "tp2", "--to", "megatron",
                     "--target_tensor_model_parallel_size", "2")
    steps.conversion(f"{family} megatron tp2 -> hf", work / "tp2", work / "back", "--to", "hf")
    if fp8_back:
        fp8 = _convert(work / "tp2", work / "back_fp8", "--to", "hf", "--hf_quantization", "fp8_block")
        steps.row(f"{family} megatron tp2 -> hf fp8", fp8, work / "back_fp8", work / "tp2")  # not verify: FP8 rounds
    return steps.rows


def run_deepseek(work: Path, layers: int, repeats: int) -> list[Row]:
    """The rows of a DeepSeek-V3-shaped FP8 model (``layers`` dense layers): dequantized while streaming."""
    return _dequantizing_rows(work, "deepseek", "fp8", lambda hf: build_synthetic_deepseek(hf, DEEPSEEK_V3, layers),
                              repeats, fp8_back=True)


def run_gpt_oss(work: Path, layers: int, repeats: int) -> list[Row]:
    """The rows of a gpt-oss-20b-shaped MXFP4 model (``layers`` layers): experts dequantized while streaming."""
    return _dequantizing_rows(work, "gpt-oss", "mxfp4", lambda hf: build_synthetic_gpt_oss(hf, GPT_OSS_20B, layers),
                              repeats)


def _tree_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def report(title: str, shapes: Shapes, rows: list[Row]) -> None:
    seconds = {row.name: row.seconds for row in rows}
    rss = {row.name: row.peak_mb for row in rows}
    startup = seconds["python -c 'import torch'"]
    memory_budget = rss["import only"] + 2 * shapes.largest_mb + 100
    print(f"\n## {title}, largest tensor {shapes.largest_mb:.0f} MB")
    print(f"time budget of a conversion: cp -r of its source (measured before it in each round) + torch start-up "
          f"({startup:.1f} s); of a verify: its conversion (measured before it in each round); memory budget of "
          f"both (import RSS + 2 x largest + 100 MB) {memory_budget:.0f} MB")
    print("| step | seconds | cp -r of its source | time / (cp + start-up) | verify / conversion | peak RSS MB "
          "| RSS / budget |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, time, mb, copy, per_conversion in rows:
        ratio, baseline = (f"{time / (copy + startup):.2f}", f"{copy:.1f}") if copy is not None else ("", "")
        verify = f"{per_conversion:.2f}" if per_conversion is not None else ""
        print(f"| {name} | {time:.1f} | {baseline} | {ratio} | {verify} | {mb:.0f} | {mb / memory_budget:.2f} |")
    if "naive megatron tp2pp2 -> hf" in rss:
        naive, ours = rss["naive megatron tp2pp2 -> hf"], rss["megatron tp2pp2 -> hf"]
        print(f"naive / ours peak RSS for tp2pp2 -> hf: {naive / ours:.1f}x")


def main(argv: list[str] | None = None) -> int:
    """Each table row as it is measured; a reader of stdout that went away (``| head``) ends the run quietly with
    141, as every command here does (``guarded``); bad input is one line and exit 2."""
    sys.stdout.reconfigure(line_buffering=True)
    return guarded(benchmark, build_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2", help="comma-separated model sizes in GB (default 2)")
    parser.add_argument("--real_shapes_layers", type=int, default=16,
                        help="layers of the Llama-3-8B-shaped model (default 16: 9.1 GB; 0: no such model)")
    parser.add_argument("--only_real_shapes", action="store_true", help="only the Llama-3-8B-shaped model's rows")
    parser.add_argument("--deepseek_layers", type=int, default=0,
                        help="dense layers of a DeepSeek-V3-shaped FP8 model (0: no such model; 2: 4.8 GB)")
    parser.add_argument("--gpt_oss_layers", type=int, default=0,
                        help="layers of a gpt-oss-20b-shaped MXFP4 model (0: no such model; 2: 3.3 GB)")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every step; the table shows the median time and the highest peak RSS (default 3)")
    parser.add_argument("--nproc", default=None,
                        help="comma-separated process counts, e.g. 1,2: only the scaling rows, for every --sizes model")
    add_flag(parser, "debug", action="store_true", help="show tracebacks")
    return parser


def benchmark(args: argparse.Namespace) -> int:
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, python {sys.version.split()[0]}; "
          f"median of {args.repeats} runs per step")
    if args.nproc:
        return scaling(args)
    peaks = {}
    for size in [] if args.only_real_shapes else [float(s) for s in args.sizes.split(",")]:
        with _workdir(args.workdir) as work:
            rows = run_size(work, size, args.repeats)
            report(f"{size} GB requested, HF source {_tree_gb(work / 'hf'):.2f} GB", SIZED, rows)
            peaks[size] = {row.name: row.peak_mb for row in rows}
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        print(f"\npeak RSS growth from {low} GB to {high} GB (same largest tensor):")
        for name in peaks[low]:
            print(f"  {name}: {peaks[high][name] - peaks[low][name]:+.0f} MB")
    if args.real_shapes_layers:
        with _workdir(args.workdir) as work:
            rows = run_real_shapes(work, args.real_shapes_layers, args.repeats)
            report(f"Llama-3-8B shapes, {args.real_shapes_layers} layers, HF source {_tree_gb(work / 'hf'):.2f} GB",
                   LLAMA3_8B, rows)
    if args.deepseek_layers:
        with _workdir(args.workdir) as work:
            rows = run_deepseek(work, args.deepseek_layers, args.repeats)
            report(f"DeepSeek-V3 shapes (FP8 source), {args.deepseek_layers} layers, HF source "
                   f"{_tree_gb(work / 'hf'):.2f} GB", DEEPSEEK_V3, rows)
    if args.gpt_oss_layers:
        with _workdir(args.workdir) as work:
            rows = run_gpt_oss(work, args.gpt_oss_layers, args.repeats)
            report(f"gpt-oss-20b shapes (MXFP4 source), {args.gpt_oss_layers} layers, HF source "
                   f"{_tree_gb(work / 'hf'):.2f} GB", GPT_OSS_20B, rows)
    print(json.dumps({"sizes": list(peaks), "real_shapes_layers": args.real_shapes_layers,
                      "deepseek_layers": args.deepseek_layers, "gpt_oss_layers": args.gpt_oss_layers}))
    return 0


def scaling(args: argparse.Namespace) -> int:
    """``--nproc``: every size's conversions at every process count."""
    counts = sorted({int(count) for count in args.nproc.split(",")})
    for size in [float(s) for s in args.sizes.split(",")]:
        with _workdir(args.workdir) as work:
            rows, startup = run_processes(work, size, counts, args.repeats)
            report_processes(f"{size} GB requested, HF source {_tree_gb(work / 'hf'):.2f} GB", rows, startup)
    return 0


@contextlib.contextmanager
def _workdir(parent: str | None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
