#!/usr/bin/env python
"""Benchmark: conversion time and peak memory, measured side by side with `cp -r` in one run.

Builds synthetic bf16 checkpoints (Llama-shaped, and Mixtral-shaped for expert parallel) of the
requested sizes; the largest tensor (the embedding) stays the same as the size grows, only the layer
count changes. Every measurement runs in its own child process; peak RSS comes from that child's
``wait4`` resource usage. Each step runs ``--repeats`` times (output removed in between); the table
shows the median time, so one step caught by a slow moment of the disk or page cache does not set
its ratio. Rows:
  cp -r                     copying the HF source tree (the disk's own speed); every conversion
                            is also paired with `cp -r` of its own source, run just before it in
                            each round, and its ratio is taken against that
  python -c 'import torch'  interpreter start-up, part of every conversion
  import only               a process importing what the tool imports (start-up RSS)
  hf->megatron tp2pp2, megatron tp2pp2->hf, tp2pp2->tp1pp1, hf->torch_dist, torch_dist->hf,
  mixtral ep2->hf           the tool
  naive tp2pp2->hf          the same conversion with every source file loaded fully and the
                            output assembled in memory before saving (what most converters do)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import _bootstrap  # noqa: F401

import torch
from transformers import LlamaConfig, MixtralConfig

from checkpoint_convert.hf_io import SafetensorsStreamWriter

REPO = Path(__file__).resolve().parents[1]
HIDDEN, FFN, HEADS, GROUPS, VOCAB = 2048, 5632, 16, 4, 32000


def _layer_shapes(experts: int) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * GROUPS
    shapes = {"input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
              "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
              "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN)}
    if experts:
        ffn = FFN // experts
        shapes.update({"mlp.gate.weight": (experts, HIDDEN), "mlp.experts.gate_up_proj": (experts, 2 * ffn, HIDDEN),
                       "mlp.experts.down_proj": (experts, HIDDEN, ffn)})
    else:
        shapes.update({"mlp.gate_proj.weight": (FFN, HIDDEN), "mlp.up_proj.weight": (FFN, HIDDEN),
                       "mlp.down_proj.weight": (HIDDEN, FFN)})
    return shapes


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def build_synthetic(path: Path, gigabytes: float, experts: int = 0) -> int:
    """A bf16 HF checkpoint of about ``gigabytes``; returns the layer count. Tensors are generated one at a time."""
    layer_bytes = sum(_numel(s) for s in _layer_shapes(experts).values()) * 2
    fixed_bytes = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    layers = max(2, 2 * round((gigabytes * 1e9 - fixed_bytes) / layer_bytes / 2))  # even, for PP=2
    entries = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
               ("lm_head.weight", (VOCAB, HIDDEN))]
    entries += [(f"model.layers.{i}.{name}", shape) for i in range(layers) for name, shape in _layer_shapes(experts).items()]
    path.mkdir(parents=True)
    writer = SafetensorsStreamWriter(path / "model.safetensors", [(n, s, torch.bfloat16) for n, s in entries])
    generator = torch.Generator().manual_seed(0)
    for name, shape in entries:
        writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                  num_key_value_heads=GROUPS, max_position_embeddings=4096, tie_word_embeddings=False)
    config = (MixtralConfig(intermediate_size=FFN // experts, num_local_experts=experts, num_experts_per_tok=2, **common)
              if experts else LlamaConfig(intermediate_size=FFN, **common))
    config.save_pretrained(path)
    return layers


# Runs one command and prints its wall time and peak RSS. It is started as a small process of its own
# because on Linux a child's ru_maxrss starts from the RSS of the process that forked it, and this
# benchmark's own process holds torch and the synthetic tensors.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)]))
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process.

    Every step starts with no dirty pages pending: earlier steps' gigabytes of output still being
    flushed to disk would otherwise throttle this step's writes (``balance_dirty_pages``) by an amount
    that depends on the order of the steps.
    """
    os.sync()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, check=True)
    seconds, rss, code = json.loads(result.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(command)}")
    return seconds, rss


def _convert(source: Path, target: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "convert.py"), "--load_path", str(source), "--save_path",
            str(target), "--quiet", *flags]


# What a conversion imports: the core, and for Hugging Face configs and the plan check, transformers'
# config and model classes of the family.
IMPORT_ONLY = """
import sys; sys.path[:0] = [{repo!r}, {scripts!r}]
import _bootstrap, checkpoint_convert.converter, accelerate
from checkpoint_convert.runtime import exit_now, transformers_attr
for name in ("LlamaConfig", "LlamaForCausalLM", "MixtralConfig", "MixtralForCausalLM", "GenerationConfig"):
    transformers_attr(name)
exit_now(0)
"""

NAIVE = """
import sys; sys.path[:0] = [{repo!r}, {scripts!r}]
import _bootstrap, functools, torch
from safetensors.torch import save_file
from checkpoint_convert import converter, megatron_io, safe_load, hf_io
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


def run_size(work: Path, gigabytes: float, repeats: int) -> list[Row]:
    """The rows of one model size; each step runs ``repeats`` times.

    A conversion's ratio is taken against ``cp -r`` of its own source, measured right before it in
    each round: ``cp -r`` of a cached tree takes 0.7 s or 3 s depending on what the page cache holds,
    and a conversion run minutes after its baseline would see another cache.
    """
    hf, mixtral = work / "hf", work / "mixtral_hf"
    build_synthetic(hf, gigabytes)
    build_synthetic(mixtral, gigabytes, experts=4)
    rows: list[Row] = []

    def timed(command: list[str], output: Path | None) -> tuple[float, float]:
        if output is not None:
            shutil.rmtree(output, ignore_errors=True)
        return measure(command)

    def row(name: str, command: list[str], output: Path | None = None, source: Path | None = None) -> None:
        runs, copies = [], []
        for _ in range(repeats):
            if source is not None:
                copies.append(timed(["cp", "-r", str(source), str(work / "copy")], work / "copy")[0])
            runs.append(timed(command, output))
        shutil.rmtree(work / "copy", ignore_errors=True)
        rows.append(Row(name, statistics.median(s for s, _ in runs), max(rss for _, rss in runs),
                        statistics.median(copies) if copies else None))

    def conversion(name: str, source: Path, target: Path, *flags: str) -> None:
        row(name, _convert(source, target, *flags), output=target, source=source)

    row("cp -r (HF source)", ["cp", "-r", str(hf), str(work / "copy")], output=work / "copy")
    row("python -c 'import torch'", [sys.executable, "-c", "import torch"])
    row("import only", [sys.executable, "-c", IMPORT_ONLY.format(repo=str(REPO), scripts=str(REPO / "scripts"))])
    conversion("hf -> megatron tp2pp2", hf, work / "tp2pp2", "--to", "megatron",
               "--target_tensor_model_parallel_size", "2", "--target_pipeline_model_parallel_size", "2")
    conversion("megatron tp2pp2 -> hf", work / "tp2pp2", work / "back", "--to", "hf")
    conversion("megatron tp2pp2 -> tp1pp1", work / "tp2pp2", work / "tp1", "--to", "megatron",
               "--target_tensor_model_parallel_size", "1", "--target_pipeline_model_parallel_size", "1")
    conversion("hf -> megatron torch_dist", hf, work / "dist", "--to", "megatron", "--megatron_ckpt_format", "torch_dist")
    conversion("megatron torch_dist -> hf", work / "dist", work / "dist_back", "--to", "hf")
    subprocess.run(_convert(mixtral, work / "ep2", "--to", "megatron", "--target_expert_model_parallel_size", "2"),
                   check=True)
    conversion("mixtral megatron ep2 -> hf", work / "ep2", work / "mixtral_back", "--to", "hf")
    naive = NAIVE.format(repo=str(REPO), scripts=str(REPO / "scripts"), source=str(work / "tp2pp2"),
                         target=str(work / "naive"))
    row("naive megatron tp2pp2 -> hf", [sys.executable, "-c", naive], output=work / "naive", source=work / "tp2pp2")
    return rows


def _tree_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def report(size: float, source_gb: float, rows: list[Row]) -> None:
    seconds = {row.name: row.seconds for row in rows}
    rss = {row.name: row.peak_mb for row in rows}
    startup = seconds["python -c 'import torch'"]
    largest_mb = VOCAB * HIDDEN * 2 / 2**20
    memory_budget = rss["import only"] + 2 * largest_mb + 100
    print(f"\n## {size} GB requested, HF source {source_gb:.2f} GB, largest tensor {largest_mb:.0f} MB")
    print(f"time budget of a conversion: cp -r of its source (measured before it in each round) + torch start-up "
          f"({startup:.1f} s); memory budget (import RSS + 2 x largest + 100 MB) {memory_budget:.0f} MB")
    print("| step | seconds | cp -r of its source | time / (cp + start-up) | peak RSS MB | RSS / budget |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, time, mb, copy in rows:
        ratio, baseline = (f"{time / (copy + startup):.2f}", f"{copy:.1f}") if copy is not None else ("", "")
        print(f"| {name} | {time:.1f} | {baseline} | {ratio} | {mb:.0f} | {mb / memory_budget:.2f} |")
    naive, ours = rss["naive megatron tp2pp2 -> hf"], rss["megatron tp2pp2 -> hf"]
    print(f"naive / ours peak RSS for tp2pp2 -> hf: {naive / ours:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2", help="comma-separated model sizes in GB (default 2)")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every step; the table shows the median time and the highest peak RSS (default 3)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, python {sys.version.split()[0]}; "
          f"median of {args.repeats} runs per step")
    peaks = {}
    for size in [float(s) for s in args.sizes.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.workdir))
        try:
            rows = run_size(work, size, args.repeats)
            report(size, _tree_gb(work / "hf"), rows)
            peaks[size] = {row.name: row.peak_mb for row in rows}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        print(f"\npeak RSS growth from {low} GB to {high} GB (same largest tensor):")
        for name in peaks[low]:
            print(f"  {name}: {peaks[high][name] - peaks[low][name]:+.0f} MB")
    print(json.dumps({"sizes": list(peaks)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
