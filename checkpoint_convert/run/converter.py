"""Conversion orchestration: open the source, plan on meta tensors, validate, then stream to disk."""
from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

import torch

from ..base.errors import BadInputError, reason
from ..base.memory import read_only_file_mappings, shares_storage
from ..base.runtime import collector_paused, transformers_attr
from ..engine.mcore_vlm import add_layout_args, layout_args, read_as_mcore_vlm
from ..engine.mtp import not_in_transformers_model
from ..engine.sources import Source, leave_out_mtp_layers, misread, open_checkpoint
from ..engine.streams import (
    HFTarget,
    Item,
    MegatronLayoutSpec,
    MegatronTarget,
    TorchDistTarget,
    plan_with_items,
    release_all,
    run,
    walk,
    warn_if_not_finite,
)
from ..engine.write_behind import WriteBehind
from ..formats import megatron_schema as schema
from ..formats.bridge_config import bridge_vocab_divisor
from ..formats.hf_io import CONFIG, GENERATION_CONFIG, copy_tokenizer, fp8_block_size, tensor_nbytes
from ..formats.hybrid import require_hybrid_layout
from ..formats.megatron_args import (
    CheckpointFacts,
    ParallelLayout,
    args_from_arch,
    carried_fields,
    dtype_from_name,
    tokenizer_for,
    with_context_length,
)
from ..formats.mindspeed_mm import MINDSPEED_MM
from ..formats.sinks import DISK, DiskSink
from ..model.arch import ModelArch
from ..model.family import FamilySpec
from ..model.parallel import layers_per_stage, padded_vocab_size
from .claim import claimed
from .distributed import Solo, Team, processes_of_this_run
from .mindspeed_mm_plan import plan_mindspeed_mm, writes_mindspeed_mm
from .output import check_paths
from .plan import Options, Plan, Share, Summary, nbytes_of, output_dtype_of, tokenizer_source
from .provenance import write_record


def open_source(options: Options, speculate: ThreadPoolExecutor | None = None) -> Source:
    source = open_checkpoint(options.load_path, options.iteration, options.trust_checkpoint, options.model,
                             options.vocab_size, speculate, options.hf_config_dir)
    if source.kind == "hf" and options.params_dtype:  # FP8 weights dequantize straight to the output dtype
        source.reader.dequantized_dtype = dtype_from_name(options.params_dtype)
    elif source.kind == "hf" and options.hf_quantization:  # ... or, quantized again, to float32 (no rounding between)
        source.reader.dequantized_dtype = torch.float32
    leave_out_mtp_layers(source, options.drop_mtp_layers)
    return source


def _target_schema(options: Options, source: Source, ckpt_format: str) -> str:
    """The requested key schema; unspecified, the source's (a legacy source becomes mcore for torch_dist)."""
    keep = options.megatron_format is None and options.transformer_impl is None and source.kind == "megatron"
    if keep and source.reader.schema != MINDSPEED_MM and not (ckpt_format == "torch_dist" and source.reader.schema == schema.LEGACY):
        return source.reader.schema
    if options.megatron_format == "legacy":
        if ckpt_format == "torch_dist":
            raise BadInputError("torch_dist checkpoints hold megatron-core models; --megatron_format legacy needs "
                                "--megatron_ckpt_format torch")
        _require_legacy_features(source.arch)
        return schema.LEGACY
    return schema.MCORE_LOCAL if options.transformer_impl == "local" else schema.MCORE_TE


def _require_legacy_features(arch: ModelArch) -> None:
    """The legacy (``language_model.*``) models have no query/key norm, no sliding-window attention, no
    multi-latent attention, no shared experts and experts in every layer or none."""
    missing = [name for name, used in (("multi-latent attention", arch.mla is not None),
                                       ("query/key norms (qk_layernorm)", arch.qk_layernorm and arch.mla is None),
                                       ("sliding-window attention", arch.window_size is not None),
                                       ("shared experts", arch.moe_shared_expert_intermediate_size is not None),
                                       ("dense layers among expert layers", arch.moe_layers is not None),
                                       ("multi-token prediction layers", arch.mtp_num_layers > 0),
                                       ("Mamba layers (a hybrid model)", arch.layer_pattern is not None),
                                       ("attention sinks (softmax_type)", arch.softmax_type != "vanilla"),
                                       ("clamped or offset gated units", arch.activation == "quick_geglu")) if used]
    if missing:
        raise BadInputError(f"--megatron_format legacy: the legacy Megatron model has no {' or '.join(missing)}, "
                            f"which this {arch.family} model uses; write --megatron_format mcore")


def target_layout(options: Options, source: Source) -> ParallelLayout:
    """The requested layout; unspecified sizes default to the source's (Megatron) or 1 (HF).

    A Megatron source's virtual pipeline, and its stages' layer counts, are kept when the pipeline
    is: no pipeline option given, or the same sizes.
    """
    megatron = source.kind == "megatron"
    source_tp, source_pp, source_ep = source.reader.args_layout if megatron else (1, 1, 1)
    source_vpp = source.reader.vpp if megatron else 1
    tp = options.tensor_parallel or source_tp
    pp = options.pipeline_parallel or _ranks_of_stages(options.pipeline_layers, options.virtual_pipeline) or source_pp
    keeps_pipeline = pp == source_pp and not options.pipeline_layers
    vpp = options.virtual_pipeline or (source_vpp if keeps_pipeline else 1)
    if keeps_pipeline and vpp == source_vpp and megatron and source.reader.ckpt_format == "torch":
        stages = source.reader.stage_layer_counts()
    else:
        _check_virtual_pipeline(source.arch.num_layers, pp, vpp, options.pipeline_layers)
        stages = layers_per_stage(source.arch.num_layers, pp * vpp, options.pipeline_layers)
    ep = options.expert_parallel or source_ep
    return ParallelLayout(tp=tp, pp=pp, ep=ep, dp=options.data_parallel, stages=tuple(stages), vpp=vpp)


def _ranks_of_stages(stages: list[int] | None, vpp: int | None) -> int | None:
    """The pipeline size implied by ``--target_pipeline_layers``: its stages are ``vpp`` chunks per rank."""
    if not stages:
        return None
    if len(stages) % (vpp or 1):
        raise BadInputError(f"--target_pipeline_layers lists {len(stages)} stages, not {vpp} model chunks for "
                            "each pipeline rank")
    return len(stages) // (vpp or 1)


def _check_virtual_pipeline(num_layers: int, pp: int, vpp: int, uneven: list[int] | None) -> None:
    """A virtual pipeline needs two pipeline ranks or more, and its stages' layer counts (even, or listed)."""
    if vpp == 1:
        return
    if vpp < 1 or pp < 2:
        raise BadInputError(f"a virtual pipeline of {vpp} model chunks per rank needs pipeline parallel size 2 or more")
    if not uneven and num_layers % (pp * vpp):
        raise BadInputError(f"PP {pp} x VPP {vpp} = {pp * vpp} stages do not divide num_layers={num_layers}; "
                            "list them with --target_pipeline_layers")


def _latent_splits(arch: ModelArch) -> tuple[tuple[str, int], ...]:
    """Multi-latent attention's down projections, whose rows megatron-core's local spec splits over TP ranks."""
    if arch.mla is None:
        return ()
    kv = (("kv latent + rotary rows", arch.mla.kv_lora_rank + arch.mla.qk_pos_emb_head_dim),)
    return kv + ((("query latent rank", arch.mla.q_lora_rank),) if arch.mla.q_lora_rank else ())


def validate_layout(arch: ModelArch, layout: ParallelLayout) -> None:
    """Tensor parallelism must divide every split dimension."""
    checks = (("attention heads", arch.num_attention_heads), ("query groups", arch.num_query_groups),
              ("ffn hidden size", arch.ffn_hidden_size)) + _latent_splits(arch)
    for what, size in checks:
        if layout.tp < 1 or size % layout.tp:
            raise BadInputError(f"tensor parallel size {layout.tp} does not divide the {size} {what}")
    if layout.dp < 1:
        raise BadInputError("data parallel size must be at least 1")
    if layout.ep > 1 and not arch.num_experts:
        raise BadInputError(f"expert parallel size {layout.ep} needs a mixture-of-experts model")
    if arch.num_experts and (layout.ep < 1 or arch.num_experts % layout.ep):
        raise BadInputError(f"expert parallel size {layout.ep} does not divide the {arch.num_experts} experts")
    for what, size in (("expert", arch.moe_ffn_hidden_size or arch.ffn_hidden_size),
                       ("shared expert", arch.moe_shared_expert_intermediate_size or 0)):
        if arch.num_experts and size % layout.tp:
            raise BadInputError(f"tensor parallel size {layout.tp} does not divide the {what} ffn size {size}")


def hf_model_from_config(config: Any, source_file: Path | None, **kwargs: Any) -> Any:
    """transformers' model of ``config``, built by the model's own code. Values its config class lets through
    but the model cannot compute with (a yarn ``beta_slow`` of -1, a string for ``mscale_all_dim``) come from
    the source: bad input naming the file they were read from, not an internal error."""
    try:
        # a vision-language model (a ``vision_config``) is built as image-text-to-text, others as causal LMs
        auto = "AutoModelForImageTextToText" if getattr(config, "vision_config", None) is not None \
            else "AutoModelForCausalLM"
        return transformers_attr(auto).from_config(config, **kwargs)
    except (ArithmeticError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise BadInputError(f"transformers cannot build the {type(config).__name__} model it describes "
                            f"({reason(error)})", source_file)


def meta_hf_model(config: Any, source_file: Path | None) -> Any:
    """transformers' model of ``config`` with its parameters on ``meta`` (buffers on the CPU: computing buffers
    (rotary frequencies) or initialising weights on meta runs torch's Python reference kernels, whose first use
    costs ~2 s of imports)."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with init_empty_weights(), no_init_weights(), collector_paused():  # imports the model's module
        return hf_model_from_config(config, source_file)


def _validate_hf_plan(planned: list, family: FamilySpec, config: Any, source_file: Path | None) -> None:
    """The planned tensors must be exactly the transformers model's parameters, with its shapes."""
    model = meta_hf_model(config, source_file)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or {}) | {"lm_head.weight"}
        expected = {name: shape for name, shape in expected.items() if name not in tied}
    produced = {name: shape for name, shape, _ in planned}
    missing = sorted(set(expected) - set(produced))
    unexpected = sorted(set(produced) - set(expected))
    wrong = sorted(n for n in set(expected) & set(produced) if expected[n] != produced[n])
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} is {produced[wrong[0]]}, {type(config).__name__} expects {expected[wrong[0]]}")
        raise BadInputError(f"converted weights do not fit the model the config describes: {detail}")


def convert(options: Options) -> Summary:
    """Run one conversion end to end; raises BadInputError before writing anything on bad input.

    A Megatron output starts streaming before transformers is imported (see ``open_checkpoint``);
    if the config class then reads config.json differently, the conversion starts over with its
    reading, so the output is always the one the config class describes.
    """
    start = time.time()
    with processes_of_this_run(options.distributed_timeout) as team, _claim(options, team):
        return team.summarized(_convert(options, team, start))


def _claim(options: Options, team: Solo | Team) -> contextlib.AbstractContextManager:
    """The save path held for the whole run (by process 0 under torchrun), once the paths are checked: no lock file
    is made in a source or beside a save path that is refused anyway."""
    if not team.leader:
        return contextlib.nullcontext()
    check_paths(options.load_path, options.save_path, options.overwrite)
    return claimed(options.save_path)


def _convert(options: Options, team: Solo | Team, start: float) -> Summary:
    """:func:`convert` in one process, or in one of the processes torchrun started (then without the early
    reading of config.json, whose misreading would make every process start over at a different time)."""
    check_paths(options.load_path, options.save_path, options.overwrite)
    if options.to not in ("hf", "megatron"):
        raise BadInputError(f"--to must be 'hf' or 'megatron', not '{options.to}'")
    dtype = dtype_from_name(options.params_dtype)
    convert_to = _to_hf if options.to == "hf" else _to_megatron
    with read_only_file_mappings(), ThreadPoolExecutor(1, thread_name_prefix="hf-config") as pool:
        source = open_source(options, pool if options.to == "megatron" and team.alone else None)
        try:
            return convert_to(options, source, dtype, start, team)
        except BaseException as error:
            if not misread(source, error):
                raise
        # ``source`` stays referenced: its mappings, registered read-only in this scope, stay mapped
        return convert_to(options, open_source(options), dtype, start, team)


def _stream(share: Share, source: Source, target: Any, dtype: torch.dtype | None, writer: Any, quiet: bool,
            beside: Future | None = None) -> None:
    """Produce each output tensor of ``share`` (all of them, or one process's) and write it behind, with a
    progress bar in bytes.

    The producing thread reads, merges and casts; the write-behind thread writes, then checks each
    distinct output for NaN/Inf (it waits for the producer more often than the producer waits for it).
    The source's mapped pages of an item are handed back once all of its outputs are produced, or,
    when an output is a view of those pages, once it is written. Work running ``beside`` the stream stops it when it fails, and
    must have finished before the last item: the output is never complete without it, and the peak
    memory (its imports plus the last item, often the largest) does not depend on how they interleave.
    """
    items, by_item = share.items, share.by_item
    tensors = source.tensors
    tensors.release_on_next_item = False
    item_bytes = _output_bytes_per_item(by_item)
    largest = max((tensor_nbytes(shape, dt) for _, _, shape, dt in by_item), default=0)

    def write_and_check(job: tuple[Hashable, Item | None], tensor: torch.Tensor) -> None:
        key, check_as = job
        writer.write(key, tensor)
        if check_as is not None:
            warn_if_not_finite(tensor, check_as)

    with share.team.progress(sum(item_bytes.values()), quiet) as bar, WriteBehind(write_and_check, largest) as behind:
        def paced(items: list[Item]) -> Iterator[Item]:
            """Each item for run() to produce once its outputs fit; the last once ``beside`` succeeded."""
            for position, item in enumerate(items, 1):
                if beside is not None and (beside.done() or position == len(items)):
                    beside.result()  # raises its error; before the last item, waits for it
                share.team.check()
                behind.wait_for_room(item_bytes.get(id(item), 0))
                yield item

        previous, read, seen, outputs, left = None, [], {}, [], _outputs_per_item(by_item)
        produced = run(paced(items), tensors, target, False, dtype, check_finite=False, keep=share.keys)
        for item, key, tensor in produced:
            if item is not previous:
                behind.call(release_all, read)  # an item whose outputs never reached its planned count
                previous, read, seen, outputs = item, tensors.take_read(), {}, []
            # replicated outputs (TP and EP copies) are one tensor object, checked once (``seen`` holds
            # them, so an id is not reused within the item); making it contiguous copies on this thread
            first_time = id(tensor) not in seen
            seen[id(tensor)] = tensor
            outputs.append(tensor.contiguous())
            behind.submit((key, item if first_time else None), outputs[-1])
            bar.set_description(f"layer {item.layer}" if item.layer is not None else item.group, refresh=False)
            bar.update(tensor.nbytes)
            left[id(item)] -= 1
            if left[id(item)] == 0:
                _hand_back_source_pages(read, outputs, behind)
                read, outputs = [], []
        behind.call(release_all, read + tensors.take_read())
    if beside is not None:
        beside.result()  # a stream with no items never reached the last one


def _outputs_per_item(by_item: list[tuple[Item, Hashable, tuple, torch.dtype]]) -> dict[int, int]:
    """How many outputs every item yields, keyed by the item's id."""
    counts: dict[int, int] = {}
    for item, *_ in by_item:
        counts[id(item)] = counts.get(id(item), 0) + 1
    return counts


def _hand_back_source_pages(read: list[torch.Tensor], outputs: list[torch.Tensor], behind: WriteBehind) -> None:
    """Release an item's source pages as soon as nothing still to be written needs them.

    Outputs that are copies (merged, split across dims, stacked, cast) no longer need the source, so
    its pages go back now, while they are written: one item's source less in memory at any time. An
    output that is a view of a source tensor (an unchanged or row-split tensor) is written from those
    pages, so they go back after its write.
    """
    if any(shares_storage(output, source) for output in outputs for source in read):
        behind.call(release_all, read)
    else:
        release_all(read)


def _output_bytes_per_item(by_item: list[tuple[Item, Hashable, tuple, torch.dtype]]) -> dict[int, int]:
    """Bytes of every item's planned outputs, keyed by the item's id (items with no output: absent)."""
    sizes: dict[int, int] = {}
    for item, _, shape, dtype in by_item:
        sizes[id(item)] = sizes.get(id(item), 0) + tensor_nbytes(shape, dtype)
    return sizes


def _finish_summary(summary: Summary, planned: list, start: float) -> Summary:
    summary.planned = planned
    summary.tensors = len(planned)
    summary.bytes_written = nbytes_of(planned)
    summary.seconds = time.time() - start
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return summary


def plan_conversion(options: Options, source: Source, dtype: torch.dtype | None) -> Plan:
    """The plan of converting ``source`` as ``options`` ask; raises BadInputError for what cannot be written."""
    return _plan_hf(options, source, dtype) if options.to == "hf" else _plan_megatron(options, source, dtype)


def write_output(plan: Plan, root: Path, sink: DiskSink, fill: Callable[[Any], None],
                 hf_config: Callable[[], Any] | None, share: Share | None = None) -> None:
    """Write every output file under ``root`` in order: ``fill(writer)`` writes the tensors, then the metadata,
    the provenance record (inside the Megatron iteration directory), and for Megatron the tracker last.

    With a ``share`` (one of several processes), this process's tensor files; the leader writes the rest once
    every process's are written.
    """
    writer = plan.writer(root, sink, share)
    fill(writer)
    parts = share.all_written(writer.close_files()) if share else [writer.close_files()]
    if parts is None:
        return
    if plan.to_hf:
        writer.finish(parts)
        tokenizer = tokenizer_source(plan.options, plan.source) if plan.source.kind == "megatron" \
            else plan.options.tokenizer_name
        _write_hf_metadata(root, hf_config(), plan.source.family, tokenizer, sink)
        write_record(root, sink, plan)
    else:
        write_record(writer.iteration_dir, sink, plan)
        writer.finish(parts)


def _plan_hf(options: Options, source: Source, dtype: torch.dtype | None) -> Plan:
    source.check_against_tensors()
    family, arch = source.family, source.arch
    _refuse_megatron_only_options(options)
    items = walk(family, arch)
    target = HFTarget(family, arch)
    by_item = plan_with_items(items, source.tensors, target, dtype)
    planned = [entry[1:] for entry in by_item]
    out_arch = with_context_length(arch, options.max_position_embeddings).replace(params_dtype=output_dtype_of(planned, dtype))
    plan = Plan(options, source, dtype, items, target, by_item, out_arch)
    if options.fp8_block_size and not options.hf_quantization:
        raise BadInputError("--fp8_block_size sets the blocks of --hf_quantization fp8_block, which is not given")
    return _quantized_plan(plan) if options.hf_quantization else plan


def _quantized_plan(plan: Plan) -> Plan:
    """``plan`` with the weights transformers loads as FP8 written block-quantized (``fp8_output``)."""
    from ..formats.fp8_output import DEFAULT_BLOCK, FP8Target, fp8_layout, warn_if_transformers_misreads
    source = plan.source
    block = plan.options.fp8_block_size or (fp8_block_size(source.reader.config, source.reader.path)
                                            if source.kind == "hf" and source.reader.scales else DEFAULT_BLOCK)
    layout = fp8_layout(meta_hf_model(hf_config_of(source.family, plan.out_arch, source.numbers_file),
                                      source.numbers_file), block)
    target = FP8Target(plan.target, layout)
    by_item = plan_with_items(plan.items, source.tensors, target, plan.dtype)
    warn_if_transformers_misreads(layout)
    return dataclasses.replace(plan, target=target, by_item=by_item, quantized=layout, unquantized=plan.planned)


def _to_hf(options: Options, source: Source, dtype: torch.dtype | None, start: float, team: Solo | Team) -> Summary:
    plan = _plan_hf(options, source, dtype)
    share = team.share(plan)
    # Importing transformers is seconds of Python on one core; the stream spends its time in torch
    # kernels and file writes, which release the GIL, so the config is built and checked beside it.
    # The leader alone writes config.json: under torchrun, the others do not import transformers to check it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-config") as pool:
        config_task = pool.submit(checked_hf_config, plan) if team.leader else None
        with team.staged_directory(options.save_path, plan.nbytes) as staging:
            def fill(writer: Any) -> None:
                _stream(share, source, plan.target, dtype, writer, options.quiet, config_task)
            write_output(plan, staging, DISK, fill, config_task and config_task.result, share)
    return _finish_summary(Summary(), plan.planned, start)


def _refuse_megatron_only_options(options: Options) -> None:
    """Flags that only Megatron args record would be lost silently in a Hugging Face output."""
    given = [flag for flag, value in (("--seq_length", options.seq_length), ("--tokenizer_type", options.tokenizer_type))
             if value is not None]
    if given:
        raise BadInputError(f"{' and '.join(given)} only apply to Megatron output (--to megatron)")


def _checked_hf_config(planned: list, family: FamilySpec, arch: ModelArch, source_file: Path | None = None) -> Any:
    """The transformers config of ``arch``, once the planned tensors are checked to fit its model."""
    config = hf_config_of(family, arch, source_file)
    _validate_hf_plan([entry for entry in planned if not not_in_transformers_model(family, arch, entry[0])], family,
                      config, source_file)
    return config


def hf_config_of(family: FamilySpec, arch: ModelArch, source_file: Path | None = None) -> Any:
    """The transformers config of ``arch``; a refusal of the architecture names the file it was read from."""
    try:
        config = family.hf_config_from_arch(arch)
        _require_rotary_percent(config, arch)
        return config
    except BadInputError as error:
        raise error if error.path or source_file is None else BadInputError(str(error), source_file)
    except Exception as error:  # the config class's own validation of values the source holds
        raise BadInputError(f"{family.hf_config_class} refuses the source's architecture ({reason(error)})")


def _require_rotary_percent(config: Any, arch: ModelArch) -> None:
    """Partial rotary embeddings (megatron-core's ``rotary_percent``) only go to a config that says so."""
    rope = getattr(config, "rope_parameters", None) or {}
    written = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    if arch.position_embedding_type == "rope" and abs(float(written) - arch.rotary_percent) > 1e-9:
        raise BadInputError(f"rotary_percent is {arch.rotary_percent}: a {arch.family} model rotates "
                            f"{written} of each head")


def checked_hf_config(plan: Plan) -> Any:
    """The transformers config a Hugging Face output gets, checked against the plan (a dry run's check); an FP8
    output's tensors are checked as they are before quantizing, and its config says how they are quantized."""
    config = _checked_hf_config(plan.unquantized or plan.planned, plan.source.family, plan.out_arch,
                                plan.source.numbers_file)
    if plan.quantized is not None:
        config.quantization_config = plan.quantized.config
    return config


def _write_hf_metadata(staging: Path, config: Any, family: FamilySpec, tokenizer: str | None,
                       sink: DiskSink) -> None:
    sink.save_pretrained(config, staging, CONFIG)
    generation = transformers_attr("GenerationConfig").from_model_config(config)
    for key, value in family.generation_defaults.items():
        setattr(generation, key, value)
    sink.save_pretrained(generation, staging, GENERATION_CONFIG)
    copy_tokenizer(tokenizer, staging, sink)


def _ckpt_format(options: Options, source: Source) -> str:
    if options.megatron_ckpt_format:
        return options.megatron_ckpt_format
    if options.megatron_bridge:
        return "torch_dist"
    return source.reader.ckpt_format if source.kind == "megatron" else "torch"


def _bridge_output(options: Options, source: Source, ckpt_format: str) -> bool:
    """Whether to save as Megatron-Bridge does: asked for, or unspecified and the source is one (torch_dist kept)."""
    if options.megatron_bridge is None:
        return ckpt_format == "torch_dist" and source.kind == "megatron" and source.reader.producer == "megatron-bridge"
    if options.megatron_bridge and ckpt_format != "torch_dist":
        raise BadInputError("--megatron_bridge writes torch_dist checkpoints, not --megatron_ckpt_format torch")
    return options.megatron_bridge


def _megatron_args(options: Options, source: Source, layout: ParallelLayout, padded: int, target_schema: str,
                   planned: list, dtype: torch.dtype | None, ckpt_format: str) -> Any:
    """The args Megatron-LM reads back: the architecture, this layout, and the source's training settings."""
    base = carried_fields(source.reader.args, source.reader.args_file) if source.kind == "megatron" else {}
    facts = CheckpointFacts(
        padded_vocab=padded, dtype=output_dtype_of(planned, dtype), divisible_by=options.make_vocab_size_divisible_by,
        impl="local" if target_schema == schema.MCORE_LOCAL else "transformer_engine", ckpt_format=ckpt_format,
        legacy=target_schema == schema.LEGACY, moe_grouped_gemm=options.moe_grouped_gemm,
        distributed_optimizer=options.use_distributed_optimizer, seq_length=options.seq_length,
        tokenizer=tokenizer_for(options.load_path if source.kind == "hf" else None, base, options.tokenizer_type,
                                options.tokenizer_name))
    return args_from_arch(with_context_length(source.arch, options.max_position_embeddings), layout, facts, base)


def _plan_megatron(options: Options, source: Source, dtype: torch.dtype | None) -> Plan:
    if options.hf_quantization or options.fp8_block_size:
        raise BadInputError("--hf_quantization and --fp8_block_size quantize Hugging Face output (--to hf)")
    source.check_against_tensors()
    family, arch = source.family, source.arch
    layout = target_layout(options, source)
    validate_layout(arch, layout)
    if writes_mindspeed_mm(options, source):
        return plan_mindspeed_mm(options, source, dtype, layout)
    family = source.family  # a MindSpeed-MM source is read through the family's own tables from here on
    ckpt_format = _ckpt_format(options, source)
    require_hybrid_layout(arch, layout.stages, layout.vpp, layout.tp)
    bridge = _bridge_output(options, source, ckpt_format)
    if bridge:  # Megatron-Bridge keeps the vocab unpadded (should_pad_vocab false), noting its own multiple
        options = dataclasses.replace(options, make_vocab_size_divisible_by=bridge_vocab_divisor(arch.vocab_size))
    padded = arch.vocab_size if bridge else padded_vocab_size(arch.vocab_size, options.make_vocab_size_divisible_by,
                                                              layout.tp)
    target_schema = _target_schema(options, source, ckpt_format)
    if family.towers and not bridge:  # megatron-core's multimodal model in rank files, or refused in one line
        read_as_mcore_vlm(source, target_schema == schema.LEGACY)
        family, vlm_args = source.family, layout_args(source.family, arch, layout.tp)
    if ckpt_format == "torch_dist":
        target = TorchDistTarget(family, arch, padded, target_schema == schema.MCORE_TE)
    else:
        target = MegatronTarget(family, arch, MegatronLayoutSpec(layout.tp, layout.stages, padded, target_schema,
                                                                 layout.ep, options.moe_grouped_gemm))
    items = walk(family, arch)
    by_item = plan_with_items(items, source.tensors, target, dtype)
    planned = [entry[1:] for entry in by_item]
    args = _megatron_args(options, source, layout, padded, target_schema, planned, dtype, ckpt_format)
    if family.towers and not bridge:
        add_layout_args(args, vlm_args)
    return Plan(options, source, dtype, items, target, by_item, arch, layout, ckpt_format, target_schema, bridge, args)


def _to_megatron(options: Options, source: Source, dtype: torch.dtype | None, start: float,
                 team: Solo | Team) -> Summary:
    plan = _plan_megatron(options, source, dtype)
    share = team.share(plan)
    with team.staged_directory(options.save_path, plan.nbytes) as staging:
        def fill(writer: Any) -> None:
            _stream(share, source, plan.target, dtype, writer, options.quiet, source.arch_check)
        write_output(plan, staging, DISK, fill, None, share)
    return _finish_summary(Summary(), plan.planned, start)
