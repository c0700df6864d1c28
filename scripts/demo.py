#!/usr/bin/env python
"""Demo: a tiny Megatron TP2 PP2 GPT-2 -> Hugging Face, loaded by transformers, logits checked."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap

import torch
from transformers import AutoModelForCausalLM

from checkpoint_convert.commands.cli import add_flag, guarded, run_convert_cli
from checkpoint_convert.base.runtime import exit_now
from megatron_gpt2.reference_writer import reference_megatron_gpt2, tiny_gpt2


def demo(args: argparse.Namespace) -> int:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        original = tiny_gpt2(None)
        megatron = reference_megatron_gpt2(original, work / "megatron", tp=2, pp=2, schema="legacy")
        print(f"1. built a tiny random GPT-2 and saved it as Megatron-LM TP=2 PP=2: {megatron}")
        code = run_convert_cli(["--load_path", str(megatron), "--save_path", str(work / "hf"), "--to", "hf"],
                               _bootstrap.FAMILIES)
        if code:
            return code
        converted = AutoModelForCausalLM.from_pretrained(work / "hf")
        tokens = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (converted(tokens).logits - original(tokens).logits).abs().max().item()
        files = sorted(p.name for p in (work / "hf").iterdir())
        print(f"2. converted to Hugging Face: {', '.join(files)}")
        print(f"3. loaded with AutoModelForCausalLM ({type(converted).__name__}); "
              f"max |logits difference| vs the original: {diff:.2e}")
    ok = diff <= 1e-5
    print(f"{'OK' if ok else 'MISMATCH'}: demo finished in {time.time() - start:.1f} s")
    return 0 if ok else 1


def main(argv=None) -> int:
    """Each step's line as it happens; a reader of stdout that went away ends it quietly with 141, as every
    command here does (``guarded``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_flag(parser, "debug", action="store_true", help="show tracebacks")
    sys.stdout.reconfigure(line_buffering=True)
    return guarded(demo, parser.parse_args(argv))


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
