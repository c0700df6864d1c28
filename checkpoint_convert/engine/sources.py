"""Opening a source checkpoint: detect its format (Hugging Face, or one of the Megatron formats through
``megatron_formats``' one dispatch) and family, and describe its architecture, reading no tensor data.

Every command opens its sources here (convert, inspect, verify), so a checkpoint means the same to all of them.
"""
from __future__ import annotations

import argparse
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from ..base.errors import BadInputError, reason
from ..base.runtime import transformers_attr
from ..formats.hf_io import HFCheckpoint, is_hf_checkpoint, read_json_object
from ..formats.megatron_args import arch_from_args
from ..formats.megatron_formats import is_megatron_checkpoint, open_megatron_tree
from ..formats.megatron_io import MegatronTree
from ..formats.mindspeed_mm import MindSpeedTree
from ..model.arch import ModelArch
from ..model.family import FamilySpec, family_for_hf_model_type, family_for_megatron, family_named, registered
from .mcore_vlm import mcore_vlm_family, trained_vlm_without_hf_config
from .mindspeed_mm import MindSpeedSource, mindspeed_mm_family
from .mtp import hf_mtp_layer_count
from .shape_check import HF_NAMES, MEGATRON_NAMES, check_against_tensors, check_config_sizes, validate_arch
from .streams import HFSource, MegatronSource


@dataclass
class Source:
    kind: str  # "megatron" or "hf"
    family: FamilySpec
    arch: ModelArch
    reader: Any  # MegatronTree, TorchDistTree or HFCheckpoint
    tensors: Any = None  # MegatronSource or HFSource
    # for an ``arch`` read from config.json before transformers was imported: the check that the
    # config class reads the same (raises MisreadArchitecture otherwise)
    arch_check: Future | None = None
    # where the architecture's numbers come from (config.json's object, or the args' fields), and how
    # they are read: what the check against the tensors needs to name a wrong field
    numbers: dict[str, Any] = field(default_factory=dict)
    numbers_file: Path | None = None
    reread: Callable[[dict[str, Any]], ModelArch] | None = None

    def check_against_tensors(self) -> None:
        """Refuse an architecture the tensors do not fit (see ``shape_check``), before anything is written."""
        check_against_tensors(self, self.reread, self.numbers, self.numbers_file)


class MisreadArchitecture(Exception):
    """config.json's values, read as plain attributes, describe another model than its config class does."""


def _megatron_family(tree: MegatronTree, arch: ModelArch, requested: str | None) -> FamilySpec:
    recorded = getattr(tree.args, "hf_family", None)
    if requested:
        spec = family_named(requested)
        if not spec.matches_megatron(arch):
            detected = family_for_megatron(arch, str(tree.iter_dir)).name
            raise BadInputError(f"--model {requested} does not match this checkpoint, which looks like {detected}",
                                tree.iter_dir)
        return spec
    if recorded in registered() and registered()[recorded].matches_megatron(arch):
        return registered()[recorded]
    return family_for_megatron(arch, str(tree.iter_dir))


def open_checkpoint(path: Path, iteration: str | None = None, trust: bool = False, model: str | None = None,
                    vocab_size: int | None = None, speculate: ThreadPoolExecutor | None = None,
                    hf_config_dir: Path | None = None) -> Source:
    """Detect a checkpoint's format and family, and describe its architecture; reads no tensor data.

    With ``speculate``, a Hugging Face architecture is read from config.json's values as they are,
    and transformers' config class (seconds of imports) reads them again on that executor
    (``Source.arch_check``): a conversion streams meanwhile and must not finish before the check.
    """
    if not path.is_dir():
        raise BadInputError("load path is not a directory", path)
    if is_megatron_checkpoint(path):
        return _open_megatron(path, iteration, trust, model, vocab_size, hf_config_dir)
    if is_hf_checkpoint(path):
        return _open_hf(path, trust, model, speculate)
    raise BadInputError("neither a Megatron checkpoint (tracker file, mp_rank_* dirs or torch_dist files) nor a "
                        "Hugging Face model directory (config.json)", path)


def _open_megatron(path: Path, iteration: str | None, trust: bool, model: str | None,
                   vocab_size: int | None, hf_config_dir: Path | None = None) -> Source:
    tree = open_megatron_tree(path, iteration, trust)
    if isinstance(tree, MindSpeedTree):
        return _open_mindspeed_mm(tree, hf_config_dir, model)
    arch = arch_from_args(tree.args, str(tree.args_file), vocab_size)
    if isinstance(tree, MegatronTree) and trained_vlm_without_hf_config(tree.args):
        return _open_trained_vlm(tree, hf_config_dir, model)
    family = _megatron_family(tree, arch, model)
    arch.family = family.name
    if family.megatron_prefix:  # a multi-tower model: the language model's keys under its prefix
        if not hasattr(tree, "within"):
            raise BadInputError(f"a {family.name} model is read from Megatron-Bridge checkpoints only, not from "
                                f"{tree.ckpt_format} rank files", tree.iter_dir)
        if tree.producer != "megatron-bridge" and family.mcore_vlm is not None:  # megatron-core's multimodal model
            family = mcore_vlm_family(family, arch, tree.args_layout[0])
        tree.within(family.megatron_prefix)
    validate_arch(arch, family, tree.args_file, vars(tree.args), MEGATRON_NAMES)

    def reread(values: dict[str, Any]) -> ModelArch:
        return arch_from_args(argparse.Namespace(**values), str(tree.args_file), vocab_size)
    return Source("megatron", family, arch, tree, MegatronSource(tree, family, arch), None,
                  dict(vars(tree.args)), tree.args_file, reread)


def _hf_config_of(hf_config_dir: Path | None, model: str | None, missing: str,
                  where: Path) -> tuple[FamilySpec, ModelArch, dict[str, Any], Path]:
    """(family, architecture, config values, config.json) of the Hugging Face directory ``--hf_config_dir`` names,
    for rank files that do not record the architecture (``missing``: what they lack)."""
    if hf_config_dir is None or not (hf_config_dir / "config.json").is_file():
        given = f" ({hf_config_dir} has no config.json)" if hf_config_dir else ""
        raise BadInputError(f"{missing}: pass --hf_config_dir, the Hugging Face model directory holding its "
                            f"config.json{given}", where)
    config_file = hf_config_dir / "config.json"
    values = read_json_object(config_file, "config")
    family = family_for_hf_model_type(values.get("model_type"), str(config_file))
    if model and model != family.name:
        raise BadInputError(f"--model {model} does not match config.json's model_type '{values.get('model_type')}'",
                            config_file)
    check_config_sizes(values, config_file)
    arch = _arch_from_config_class(family, values, config_file)
    validate_arch(arch, family, config_file, values, HF_NAMES)
    return family, arch, values, config_file


def _open_mindspeed_mm(tree: MindSpeedTree, hf_config_dir: Path | None, model: str | None) -> Source:
    """MindSpeed-MM's rank files record no architecture: it is the Hugging Face config's, as for its own mm_to_hf."""
    family, arch, values, config_file = _hf_config_of(hf_config_dir, model, "MindSpeed-MM rank files record no "
                                                      "architecture", tree.iter_dir)
    family = mindspeed_mm_family(family)
    return _configured_by_hf(tree, family, arch, MindSpeedSource(tree, family, arch), values, config_file)


def _open_trained_vlm(tree: MegatronTree, hf_config_dir: Path | None, model: str | None) -> Source:
    """Rank files of megatron-core's multimodal model as Megatron-LM's training or ``saver_llava`` writes them: its
    args name the vision model type but not the Hugging Face model's vision config or image token, which come from
    ``--hf_config_dir`` (the tensors' shapes are checked against it before anything is written)."""
    family, arch, values, config_file = _hf_config_of(
        hf_config_dir, model, f"the args name vision model type '{tree.args.vision_model_type}' but not the Hugging "
        "Face vision config and image token", tree.iter_dir)
    family = mcore_vlm_family(family, arch, tree.tp)
    tree.within(family.megatron_prefix)
    return _configured_by_hf(tree, family, arch, MegatronSource(tree, family, arch), values, config_file)


def _configured_by_hf(tree: Any, family: FamilySpec, arch: ModelArch, tensors: Any, values: dict[str, Any],
                      config_file: Path) -> Source:
    """A Megatron source whose architecture is the Hugging Face config's: its numbers, and their re-reading, are
    config.json's."""
    def reread(changed: dict[str, Any]) -> ModelArch:
        return _arch_from_config_class(family, changed, config_file)
    return Source("megatron", family, arch, tree, tensors, None, values, config_file, reread)


def _open_hf(path: Path, trust: bool, model: str | None, speculate: ThreadPoolExecutor | None) -> Source:
    checkpoint = HFCheckpoint(path, trust)
    config_file = path / "config.json"
    family = family_for_hf_model_type(checkpoint.config.get("model_type"), str(config_file))
    if model and model != family.name:
        raise BadInputError(f"--model {model} does not match config.json's model_type "
                            f"'{checkpoint.config.get('model_type')}'", config_file)
    if family.hf_aliases:
        checkpoint.add_aliases(family.hf_aliases(checkpoint.names()))
    check_config_sizes(checkpoint.config, config_file)
    arch = _arch_as_written(family, checkpoint.config) if speculate else None
    check = speculate.submit(_confirm_arch, family, checkpoint.config, arch, config_file) if arch else None
    arch = arch or _arch_from_config_class(family, checkpoint.config, config_file)
    validate_arch(arch, family, config_file, checkpoint.config, HF_NAMES)
    if family.mtp_head:  # a new object: the speculative check compares the reading of config.json alone
        arch = arch.replace(mtp_num_layers=hf_mtp_layer_count(arch, checkpoint.names(), config_file))

    def reread(values: dict[str, Any]) -> ModelArch:
        return _arch_as_written(family, values) or _arch_from_config_class(family, values, config_file)
    return Source("hf", family, arch, checkpoint, HFSource(checkpoint, family, arch), check,
                  checkpoint.config, config_file, reread)


def _arch_from_config_class(family: FamilySpec, values: dict[str, Any], file: Path) -> ModelArch:
    """The architecture config.json describes, read through the family's transformers config class.

    Whatever the class or the family's reading raises is the file's fault: bad input naming it.
    """
    try:
        return family.arch_from_hf_config(transformers_attr(family.hf_config_class)(**values))
    except BadInputError as error:
        raise error if error.path else BadInputError(str(error), file)
    except Exception as error:  # the config class's own validation (ValueError, TypeError, ZeroDivisionError...)
        raise BadInputError(f"{family.hf_config_class} cannot read it ({reason(error)})", file)


def _arch_as_written(family: FamilySpec, values: dict[str, Any]) -> ModelArch | None:
    """The architecture read from config.json's values as plain attributes (no class defaults).

    None when that reading fails (a key left to the class's defaults, a value the class would
    convert): the conversion then waits for the config class, as without speculation.
    """
    try:
        return family.arch_from_hf_config(SimpleNamespace(**values))
    except Exception:  # any failure only means no head start; the config class reports real errors
        return None


def _confirm_arch(family: FamilySpec, values: dict[str, Any], guess: ModelArch, file: Path) -> ModelArch:
    arch = _arch_from_config_class(family, values, file)
    if arch != guess:
        raise MisreadArchitecture(arch)
    return arch


def mtp_tensors(source: Source) -> list[str]:
    """The source's multi-token prediction tensors: megatron-core's ``mtp.*``, or what the family names so."""
    if source.kind == "megatron":
        return sorted({name for rank in source.reader.files for _, name in source.reader.all_weight_names(rank)
                       if name.startswith("mtp.")})
    test = source.family.hf_mtp_tensor
    return [name for name in source.reader.names() if test and test(source.arch, name)]


def leave_out_mtp_layers(source: Source, drop: bool) -> None:
    """Multi-token prediction layers are converted for the families that have them (``FamilySpec.mtp_head``); left
    out, with a warning, when asked; else refused."""
    if drop:
        source.arch.mtp_num_layers = 0  # the arch the source's tensors are read with, too
    elif source.family.mtp_head:
        return
    found = mtp_tensors(source)
    declared = source.numbers.get("mtp_num_layers") if source.kind == "megatron" else None
    if declared and not found and not drop:  # the tensors name the layers when there are some
        raise BadInputError(f"mtp_num_layers is {declared}: multi-token prediction layers are not converted; pass "
                            "--drop_mtp_layers to convert the model without them", source.numbers_file)
    if not found:
        return
    if not drop:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise BadInputError(f"multi-token prediction layers are not converted ({found[0]}{more}); pass "
                            "--drop_mtp_layers to convert the model without them", source.numbers_file)
    warnings.warn(f"left out {len(found)} tensors of multi-token prediction layers (--drop_mtp_layers)")
    source.tensors.left_out.update(found)


def misread(source: Source, error: BaseException) -> bool:
    """Whether ``error`` may come from a wrong early reading of config.json (then the config class decides)."""
    if isinstance(error, MisreadArchitecture):
        return True
    if source.arch_check is None or isinstance(error, KeyboardInterrupt):
        return False
    try:
        source.arch_check.result()
    except Exception:  # a misreading, or the config class's own error, which a fresh start reports
        return True
    return False
