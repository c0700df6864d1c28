"""Megatron ``torch`` checkpoints the way a training run writes them, made from a tree this converter wrote.

A converter's output holds only what conversion needs (args, version, iteration, model with ``None``
extra states). A training run stores much more in every rank file; this module adds it, field by field
as the upstream sources write it (read at NVIDIA/Megatron-LM d98e8a64dd and NVIDIA/TransformerEngine
d0067d0da, and 8c004241d^ for the older extra state):

- ``megatron/training/checkpointing.py``: ``save_checkpoint`` -> ``generate_state_dict`` stores
  ``args``, ``checkpoint_version`` 3.0, ``iteration``, ``model`` (``model0``, ... with virtual stages),
  ``optimizer`` (``optimizer.state_dict()``), ``opt_param_scheduler``, ``rng_state`` and
  ``num_floating_point_operations_so_far`` in ``iter_NNNNNNN/mp_rank_*/model_optim_rng.pt``; the tracker
  names the latest iteration. ``get_rng_state`` stores a one-item list (per data-parallel rank) of
  ``{random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state, rng_tracker_states}``.
- With ``--use-distributed-optimizer``, ``optimizer`` holds ``DistributedOptimizer.state_dict()``
  (param groups without params, no per-parameter state) and ``save_parameter_state`` writes
  ``get_parameter_state_dp_zero()`` to ``distrib_optim.pt`` beside it: ``{"buckets_coalesced": True,
  buffer: {(param dtype, grad dtype): {"param", "exp_avg", "exp_avg_sq": flat fp32, "numel_unpadded"}}}``.
- Transformer Engine's ``TransformerEngineBaseModule.get_extra_state`` (every TE linear layer and
  ``core_attention``): before 8c004241d (TE 1.13) an ``io.BytesIO`` holding ``torch.save(state)``
  (``torch.save(None)`` without FP8); since, a ``uint8`` tensor of ``pickle.dumps(state)`` (empty
  without FP8), ``state`` holding the recipe, the FP8 scales and amax histories. Megatron's own
  output layer (``ColumnParallelLinear``) stores ``None``.
"""
from __future__ import annotations

import io
import pickle
import random
import sys
import types
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

FP8_ARGS = dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_interval=1, fp8_amax_history_len=16,
                fp8_amax_compute_algo="max", fp8_wgrad=True, fp8_param_gather=False, first_last_layers_bf16=False,
                transformer_impl="transformer_engine")
SCHEDULER = dict(max_lr=3e-4, lr_warmup_steps=2000, num_steps=0, lr_decay_style="cosine", lr_decay_steps=100000,
                 min_lr=3e-5, start_wd=0.1, end_wd=0.1, wd_incr_style="constant", wd_incr_steps=100000)


class DelayedScaling:
    """Stands for Transformer Engine's recipe class inside a pickled FP8 state (see :func:`_te_pickle`)."""

    def __init__(self) -> None:
        self.margin, self.amax_history_len, self.amax_compute_algo = 0, 16, "max"


def _te_pickle(state: dict) -> bytes:
    """``pickle.dumps(state)`` naming ``transformer_engine.common.recipe.DelayedScaling``, as TE's does:
    unpickling it would import Transformer Engine."""
    names = ("transformer_engine", "transformer_engine.common", "transformer_engine.common.recipe")
    assert not any(name in sys.modules for name in names), "Transformer Engine itself is imported"
    modules = {name: types.ModuleType(name) for name in names}
    modules[names[-1]].DelayedScaling = DelayedScaling
    DelayedScaling.__module__ = names[-1]
    sys.modules.update(modules)
    try:
        return pickle.dumps(state)
    finally:
        for name in names:
            del sys.modules[name]
        DelayedScaling.__module__ = __name__


def _fp8_state(gemms: int, seed: int, with_recipe: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {
        "scale_fwd": torch.rand(3 * gemms, generator=generator) + 0.5,
        "amax_history_fwd": torch.rand(16, 3 * gemms, generator=generator),
        "scale_bwd": torch.rand(2 * gemms, generator=generator) + 0.5,
        "amax_history_bwd": torch.rand(16, 2 * gemms, generator=generator),
        "extra_fp8_variables": {"fp8_checkpoint": True, "num_gemms": gemms, "fp8_max_fwd": 448.0,
                                "fp8_max_bwd": 57344.0, "global_fp8_buffer_pos_fwd": seed},
    }
    if with_recipe:
        state["recipe"] = DelayedScaling()
    else:  # TE 1.x also stored the inverse scales
        state["scale_inv_fwd"], state["scale_inv_bwd"] = 1 / state["scale_fwd"], 1 / state["scale_bwd"]
    return state


def te_extra_state(form: str, fp8: bool, seed: int) -> io.BytesIO | torch.Tensor:
    """One TE module's ``_extra_state``: ``form`` "bytesio" (TE < 1.13) or "uint8" (TE >= 1.13)."""
    if form == "bytesio":
        buffer = io.BytesIO()
        torch.save(_fp8_state(1, seed, with_recipe=False) if fp8 else None, buffer)
        return buffer
    if not fp8:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(_te_pickle(_fp8_state(1, seed, with_recipe=True))), dtype=torch.uint8)


def with_te_extra_state(model: dict, form: str, seed: int) -> dict:
    """Every ``*._extra_state`` of a TE-spec model as TE writes it; FP8 state on the linear layers."""
    out = {}
    for index, (key, value) in enumerate(model.items()):
        module = key[: -len("._extra_state")] if key.endswith("._extra_state") else None
        if module is None or module == "output_layer":
            out[key] = value
            continue
        out[key] = te_extra_state(form, fp8=not module.endswith("core_attention"), seed=seed * 1000 + index)
    return out


def rng_state(seed: int, graph_safe: bool) -> list[dict]:
    """``get_rng_state``'s value for one rank (no data-parallel random init): a one-item list.

    The RNG tracker's states are CUDA RNG states (byte tensors), or ``torch.Generator`` objects when it
    is graph-safe (``--te-rng-tracker``, CUDA graphs): a CPU generator here, pickled the same way.
    """
    python = random.Random(seed)
    cuda_like = lambda offset: torch.tensor(list(range(offset, offset + 16)), dtype=torch.uint8)  # noqa: E731
    tracker = lambda offset: torch.Generator().manual_seed(offset) if graph_safe else cuda_like(offset)  # noqa: E731
    return [{
        "random_rng_state": python.getstate(),
        "np_rng_state": np.random.RandomState(seed).get_state(),
        "torch_rng_state": torch.Generator().manual_seed(seed).get_state(),
        "cuda_rng_state": cuda_like(seed % 200),
        "rng_tracker_states": {"model-parallel-rng": tracker(1), "expert-parallel-rng": tracker(2),
                               "data-parallel-rng": tracker(3)},
    }]


def _adam_after_one_step(params: list[torch.Tensor], seed: int) -> torch.optim.Adam:
    generator = torch.Generator().manual_seed(seed)
    copies = [torch.nn.Parameter(p.detach().clone().float()) for p in params]
    adam = torch.optim.Adam(copies, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for copy in copies:
        copy.grad = torch.randn(copy.shape, generator=generator)
    adam.step()
    return adam


def _megatron_param_groups(groups: list[dict]) -> list[dict]:
    """torch's param groups plus the fields Megatron's ``_get_param_groups`` adds."""
    return [{**group, "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False,
             "default_config": True} for group in groups]


def optimizer_state(params: list[torch.Tensor], seed: int) -> dict:
    """``Float16OptimizerWithFloat16Params.state_dict()``: the inner Adam's state, fp32 main params."""
    inner = _adam_after_one_step(params, seed).state_dict()
    inner["param_groups"] = _megatron_param_groups(inner["param_groups"])
    return {"optimizer": inner, "grad_scaler": {"scale": torch.tensor(65536.0), "growth_tracker": 0,
                                                "hysteresis_tracker": 2},
            "fp32_from_fp16_params": [[p.detach().clone().float() for p in params]]}


def distributed_optimizer_state(params: list[torch.Tensor], seed: int) -> tuple[dict, dict]:
    """(``DistributedOptimizer.state_dict()`` for the rank file, what ``distrib_optim.pt`` holds)."""
    adam = _adam_after_one_step(params, seed)
    inner = adam.state_dict()
    groups = [{key: value for key, value in group.items() if key != "params"} | {"step": 1}
              for group in _megatron_param_groups(inner["param_groups"])]
    flat = {key: torch.cat([adam.state[p][key].reshape(-1) for p in adam.param_groups[0]["params"]])
            for key in ("exp_avg", "exp_avg_sq")}
    flat["param"] = torch.cat([p.detach().reshape(-1) for p in adam.param_groups[0]["params"]])
    buffer = {(torch.float32, torch.float32): {**flat, "numel_unpadded": flat["param"].numel()}}
    return {"optimizer": {"param_groups": groups}}, {"buckets_coalesced": True, 0: buffer}


def _training_args(args, iteration: int, distributed_optimizer: bool, graph_safe_rng: bool) -> None:
    from megatron.core.enums import Fp8Recipe
    from megatron.core.transformer.enums import AttnBackend

    for name, value in {**FP8_ARGS, "fp8_recipe": Fp8Recipe.delayed, "attention_backend": AttnBackend.auto,
                        "iteration": iteration, "train_iters": 500000, "consumed_train_samples": iteration * 256,
                        "use_distributed_optimizer": distributed_optimizer, "ckpt_format": "torch",
                        "te_rng_tracker": graph_safe_rng,
                        "save": "/lustre/run/checkpoints", "load": "/lustre/run/checkpoints"}.items():
        setattr(args, name, value)


def _rank_state(state: dict, iteration: int, form: str, distributed_optimizer: bool, seed: int,
                weight_scale: float) -> tuple[dict, dict | None]:
    """One rank file's dict as the training run stores it, and its ``distrib_optim.pt`` (or None)."""
    graph_safe_rng = form == "bytesio"  # the older run (TE < 1.13) used TE's graph-safe RNG tracker
    _training_args(state["args"], iteration, distributed_optimizer, graph_safe_rng)
    state["iteration"] = iteration
    chunks = [key for key in state if key == "model" or (key.startswith("model") and key[5:].isdigit())]
    params = []
    for chunk in chunks:
        model = {key: value * weight_scale if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                 for key, value in state[chunk].items()}
        state[chunk] = with_te_extra_state(model, form, seed)
        params += [value for key, value in model.items() if isinstance(value, torch.Tensor)]
    parameter_state = None
    if distributed_optimizer:
        state["optimizer"], parameter_state = distributed_optimizer_state(params, seed)
    else:
        state["optimizer"] = optimizer_state(params, seed)
    state["opt_param_scheduler"] = {**SCHEDULER, "num_steps": iteration * 256}
    state["rng_state"] = rng_state(seed, graph_safe_rng)
    state["num_floating_point_operations_so_far"] = iteration * 1.5e15
    return state, parameter_state


def as_training_run(tree: Path, out: Path, iterations: Sequence[int], form: str,
                    distributed_optimizer: bool = False) -> Path:
    """Write the ``release/`` rank files of ``tree`` as the checkpoints of a training run at ``iterations``.

    The last iteration holds the tree's weights; earlier ones hold them scaled by 0.5 (another model), so a
    reader that picks the wrong iteration gives other logits. The tracker names the last iteration.
    """
    for position, iteration in enumerate(iterations):
        scale = 1.0 if position == len(iterations) - 1 else 0.5
        for seed, file in enumerate(sorted((tree / "release").glob("mp_rank_*/model_optim_rng.pt"))):
            state, parameter_state = _rank_state(torch.load(file, weights_only=False), iteration, form,
                                                 distributed_optimizer, seed + 1, scale)
            rank_dir = out / f"iter_{iteration:07d}" / file.parent.name
            rank_dir.mkdir(parents=True)
            torch.save(state, rank_dir / "model_optim_rng.pt")
            if parameter_state is not None:
                torch.save(parameter_state, rank_dir / "distrib_optim.pt")
    (out / "latest_checkpointed_iteration.txt").write_text(str(iterations[-1]))
    return out
