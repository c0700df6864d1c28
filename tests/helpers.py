"""Test helpers: tiny random models, logits comparison, the CLI run in-process."""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import _bootstrap  # noqa: E402,F401  (registers the families)
from checkpoint_convert.commands.cli import run_convert_cli  # noqa: E402
from megatron_gpt2.reference_writer import randomize, reference_megatron_gpt2, tiny_gpt2  # noqa: E402,F401

TOKENS = torch.tensor([[3, 17, 250, 999, 42, 7, 512, 64, 1, 900, 33, 5], [8, 8, 120, 600, 2, 77, 13, 404, 0, 5, 6, 991]])


def logits_of(path_or_model, tokens: torch.Tensor = TOKENS, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(path_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=dtype)
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert expected.abs().mean() > 0.1, "reference logits are too small to detect mapping bugs"
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max logits difference {diff} > {atol}"


@contextlib.contextmanager
def plain_torch_allowlist() -> Iterator[None]:
    """torch's allowlist of safe globals as in the command-line tool's process, for the block.

    Importing megatron-core (as the megatron-core tests do, in the same pytest process) registers its
    own safe globals with torch for good, ``io.BytesIO`` and its enums among them; a test that a file
    loads without ``--trust_checkpoint`` must not pass thanks to them.
    """
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.add_safe_globals(registered)


def convert(*argv: str) -> int:
    """Run the convert CLI in-process (quiet) and return its exit code."""
    return run_convert_cli([*map(str, argv), "--quiet"], _bootstrap.FAMILIES)



def assert_reports_read(source: Path, tree: Path, family: str, capsys: Any) -> None:
    """The commands that write nothing read a converted multi-tower tree: inspect --check names the family,
    verify --logits finds the original's logits, a dry run back to Hugging Face creates nothing."""
    from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli
    capsys.readouterr()
    assert run_inspect_cli([str(tree), "--check"]) == 0
    assert family in capsys.readouterr().out
    assert run_verify_cli([str(source), str(tree), "--logits"]) == 0
    assert "logits: max |diff| 0" in capsys.readouterr().out
    assert convert("--load_path", tree, "--save_path", tree.parent / "dry", "--to", "hf", "--dry_run") == 0
    assert not (tree.parent / "dry").exists()


def per_expert_layout(source: Path, out: Path, rename: dict[str, str], gate: str, up: str, down: str) -> Path:
    """A copy of a Hugging Face model whose fused expert tensors (``mlp.experts.gate_up_proj`` [experts, 2*ffn,
    hidden], ``mlp.experts.down_proj``) are written per expert as older transformers versions did:
    ``{experts}{E}.{gate|up|down}.weight`` with ``experts`` what ``rename`` makes of 'mlp.experts.'; ``rename``
    also renames other layer tensors (e.g. Mixtral's 'mlp.gate.' -> 'block_sparse_moe.gate.')."""
    from safetensors.torch import load_file, save_file

    def renamed(name: str) -> str:
        return next((name.replace(old, new) for old, new in rename.items() if old in name), name)

    old = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.endswith("mlp.experts.gate_up_proj"):
            for e, fused in enumerate(tensor):
                for part, half in zip((gate, up), fused.chunk(2)):
                    old[renamed(name.replace("gate_up_proj", f"{e}.{part}.weight"))] = half.clone()
        elif name.endswith("mlp.experts.down_proj"):
            for e, weight in enumerate(tensor):
                old[renamed(name.replace("down_proj", f"{e}.{down}.weight"))] = weight.clone()
        else:
            old[renamed(name)] = tensor
    out.mkdir(parents=True)
    save_file(old, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((source / "config.json").read_text())
    return out


def stored_names(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def as_virtual_pipeline(tree: Path, out: Path, pp: int, vpp: int) -> Path:
    """Regroup a ``release/`` tree of ``pp * vpp`` pipeline stages into ``pp`` rank files of ``vpp`` model
    chunks each, the way Megatron-LM saves an interleaved (virtual) pipeline: chunk ``v`` of pipeline
    rank ``p`` is stage ``v * pp + p``. Works on the files alone (plain ``torch.load``/``torch.save``)."""
    stage_files = {}
    for rank_dir in sorted((tree / "release").glob("mp_rank_*")):
        tp, stage = (int(part) for part in rank_dir.name.split("_")[2:4])
        stage_files[tp, stage] = rank_dir / "model_optim_rng.pt"
    tps = sorted({tp for tp, _ in stage_files})
    assert sorted(stage for _, stage in stage_files) == sorted(list(range(pp * vpp)) * len(tps))
    for tp in tps:
        for rank in range(pp):
            chunks = [torch.load(stage_files[tp, v * pp + rank], weights_only=False) for v in range(vpp)]
            state = {key: value for key, value in chunks[0].items() if key != "model"}
            state["args"].pipeline_model_parallel_size = pp
            state["args"].virtual_pipeline_model_parallel_size = vpp
            state.update({f"model{v}": chunk["model"] for v, chunk in enumerate(chunks)})
            (out / "release" / f"mp_rank_{tp:02d}_{rank:03d}").mkdir(parents=True)
            torch.save(state, out / "release" / f"mp_rank_{tp:02d}_{rank:03d}" / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    return out


def with_args(source: Path, out: Path, **changes: Any) -> Path:
    """A copy of a TP1 Megatron tree (``mp_rank_00``) whose args have ``changes``."""
    tree = shutil.copytree(source, out)
    rank_file = tree / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    vars(state["args"]).update(changes)
    torch.save(state, rank_file)
    return tree
