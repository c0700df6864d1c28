"""Seeded mutation fuzzing: damaged sources of every input format, through every command that reads them.

Valid tiny sources of every format (Hugging Face single file and sharded, DeepSeek-V3 FP8 with block
scales, gpt-oss MXFP4, Qwen2.5-VL, InternVL and LLaVA vision-language models; Megatron ``torch`` in the
legacy schema with PP, megatron-core with TP x PP, with EP, a hybrid Mamba model at TP 2, a multi-token
prediction model at PP 2 and megatron-core's LLaVA at TP 2; ``torch_dist``; Megatron-Bridge checkpoints, a
copy of ``../shared/fixtures/megatron_bridge_llama`` and a vision-language one) are copied and damaged:

- file mutations (a seeded loop): truncate a file at a random offset; flip bytes in a safetensors
  header, a pickle, a zip directory, a JSON file or anywhere; delete, duplicate or swap files;
- field mutations (property-based, ``hypothesis``): set one field of ``config.json`` (nested values such as
  ``quantization_config.weight_block_size`` too), an index, Megatron-Bridge's ``run_config.yaml`` (any plain
  value of its model provider: a lie about the model), the Megatron ``args`` (in every rank file, or only the
  first), a rank file's ``checkpoint_version`` / ``iteration``, ``common.pt``, a safetensors header (header
  length, shapes, data offsets, dtypes) or a ``torch_dist`` ``.metadata`` (global sizes, chunk offsets and
  sizes, byte offsets and lengths) to 0, -1, a larger value or a string (a dtype to another of the same or
  another size; a flag to its opposite or None).

Each damaged copy is converted in-process (Hugging Face or Megatron output, sometimes reshaped), then read by
the commands that write nothing: ``convert --dry_run``, ``inspect``, ``inspect --check``, ``verify`` against the
intact original in both orders and ``verify --logits``. Every command must give exit 0, 2 or its own "found
a difference / problem" code (3; never 1); no traceback; on failure exactly one ``error:`` line (warnings
are held back then), no output directory that looks complete (none at all but for a convert that succeeded),
and the damaged copy and the original byte-identical. CI draws one reading command per damaged copy (verify
--logits, a quarter of a second, rarely); ``FUZZ_READERS=all`` runs them all.

Reproducible from the printed seed. Environment variables:

- ``FUZZ_SEED`` (default 0): base seed of both tests;
- ``FUZZ_MUTATIONS`` (default 400): file mutations; ``FUZZ_FIELD_EXAMPLES`` (default 300): field mutations;
- ``FUZZ_ONLY=N``: run only file mutation number N (what a failure message names);
- ``FUZZ_EXHAUSTIVE=1``: also try every field with every bad value (thousands of damaged copies; all readers
  for each unless ``FUZZ_READERS=one``);
- ``FUZZ_READERS``: ``one`` (the default without FUZZ_EXHAUSTIVE) or ``all`` reading commands per damaged copy;
- ``FUZZ_KEEP_GOING=1``: the loops run to the end and report every failure at once.

A long run by hand (``-s`` prints a count of every outcome per command): ``FUZZ_SEED=23 FUZZ_MUTATIONS=2000
FUZZ_FIELD_EXAMPLES=1000 FUZZ_EXHAUSTIVE=1 FUZZ_READERS=one FUZZ_KEEP_GOING=1 python -m pytest -q -s
tests/test_fuzz.py`` (about 10 minutes; every field with one reader each took 6 minutes for 7,000 damaged copies;
with ``FUZZ_READERS=all`` a damaged copy takes about 0.3 s: 1,500 file mutations, 7 minutes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import yaml

from tests.helpers import _bootstrap, plain_torch_allowlist, reference_megatron_gpt2, run_convert_cli, tiny_gpt2
from tests.test_errors import snapshot

from checkpoint_convert.base.errors import EXIT_BAD_INPUT, EXIT_MISMATCH  # noqa: E402  (after tests.helpers: sys.path)
from checkpoint_convert.commands.report_cli import run_inspect_cli, run_verify_cli  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

SEED = int(os.environ.get("FUZZ_SEED", "0"))
MUTATIONS = int(os.environ.get("FUZZ_MUTATIONS", "400"))
FIELD_EXAMPLES = int(os.environ.get("FUZZ_FIELD_EXAMPLES", "300"))
ONLY = os.environ.get("FUZZ_ONLY")
EXHAUSTIVE = os.environ.get("FUZZ_EXHAUSTIVE") == "1"
KEEP_GOING = os.environ.get("FUZZ_KEEP_GOING") == "1"
EVERY_READER = os.environ.get("FUZZ_READERS", "all" if EXHAUSTIVE else "one") == "all"

HF_TARGETS = (("--to", "megatron"), ("--to", "megatron", "--megatron_ckpt_format", "torch_dist"), ("--to", "hf"))
MEGATRON_TARGETS = (("--to", "hf"), ("--to", "megatron", "--target_tensor_model_parallel_size", "1",
                                     "--target_pipeline_model_parallel_size", "1"))


class Sources(dict):
    """Source name -> directory (a short repr: hypothesis prints its test's arguments)."""

    def __repr__(self) -> str:
        return f"<{len(self)} fuzz sources: {', '.join(sorted(self))}>"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Iterator[Sources]:
    """Every input format, tiny and valid; none of them changed by the runs that read them (verify)."""
    built = _build_sources(tmp_path_factory.mktemp("fuzz_sources"))
    before = {name: snapshot(path) for name, path in built.items()}
    yield built
    assert {name: snapshot(path) for name, path in built.items()} == before, "an intact source changed"


def _build_sources(root: Path) -> Sources:
    from tests.family_kit import VARIANTS
    from tests.helpers import convert
    from tests.test_deepseek import fp8_copy
    from tests.test_llama import tiny_llama
    from tests.test_megatron_bridge import BRIDGE_TREE
    from tests.test_mixtral import tiny_mixtral

    gpt2 = tiny_gpt2(root / "hf_single", layers=2)
    llama = tiny_llama(root / "llama_single")
    llama.save_pretrained(root / "hf_sharded", max_shard_size="200KB")
    reference_megatron_gpt2(gpt2, root / "megatron_legacy_pp2", pp=2, version=1.0, schema="legacy")
    tiny_mixtral(root / "mixtral_hf")
    next(v for v in VARIANTS if v.name == "deepseek_v3_mla").build(root / "deepseek_v3")
    fp8_copy(root / "deepseek_v3", root / "hf_deepseek_fp8", block=16)  # partial blocks: 24-row kv_a_proj
    shutil.copytree(BRIDGE_TREE, root / "megatron_bridge")
    for path in (root / "megatron_bridge", *(root / "megatron_bridge").rglob("*")):
        path.chmod(path.stat().st_mode | 0o200)  # the shared fixture is read-only
    built = {name: root / name for name in ("hf_single", "hf_sharded", "hf_deepseek_fp8", "megatron_legacy_pp2",
                                            "megatron_bridge", *_build_newer_kinds(root))}
    for name, hf, flags in (
            ("megatron_mcore_tp2_pp2", "llama_single", ("--target_tensor_model_parallel_size", "2",
                                                        "--target_pipeline_model_parallel_size", "2")),
            ("megatron_moe_ep2_pp2", "mixtral_hf", ("--target_expert_model_parallel_size", "2",
                                                    "--target_pipeline_model_parallel_size", "2")),
            ("torch_dist", "llama_single", ("--megatron_ckpt_format", "torch_dist")),
            ("megatron_hybrid_tp2", "nemotron_h", ("--target_tensor_model_parallel_size", "2")),
            ("megatron_mtp_pp2", "deepseek_v3_mtp", ("--target_pipeline_model_parallel_size", "2")),
            ("megatron_bridge_vl", "hf_qwen2_5_vl", ("--megatron_bridge",)),
            ("megatron_llava_tp2", "hf_llava", ("--target_tensor_model_parallel_size", "2"))):
        assert convert("--load_path", root / hf, "--save_path", root / name, "--to", "megatron", *flags) == 0
        built[name] = root / name
    return Sources(built)


def _build_newer_kinds(root: Path) -> tuple[str, ...]:
    """Hugging Face sources of the newer kinds (the Megatron ones are converted from them): an MXFP4 gpt-oss,
    a vision-language model (two towers), and the originals of a hybrid Mamba and a multi-token prediction tree."""
    from tests.family_kit import GPT_OSS, VARIANTS, hf_model, tiny_internvl
    from tests.test_gpt_oss import mxfp4_copy
    from tests.test_mtp import MODELS, _with_mtp_layer
    from tests.llava_helpers import tiny_llava
    from tests.test_qwen2_vl import tiny_vl

    hf_model("GptOssConfig", "GptOssForCausalLM", 13, **{**GPT_OSS, "intermediate_size": 64})(root / "gpt_oss")
    mxfp4_copy(root / "gpt_oss", root / "hf_gpt_oss_mxfp4")
    tiny_vl("qwen2_5_vl", root / "hf_qwen2_5_vl")
    tiny_internvl(root / "hf_internvl", "llama")
    tiny_llava(root / "hf_llava")
    next(v for v in VARIANTS if v.name == "nemotron_h_hybrid_mha").build(root / "nemotron_h")
    MODELS["deepseek_v3"][0](root / "deepseek_v3_mtp")
    _with_mtp_layer(root / "deepseek_v3_mtp", 3)
    return "hf_gpt_oss_mxfp4", "hf_qwen2_5_vl", "hf_internvl", "hf_llava"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---- file mutations ---------------------------------------------------------------------------------

def _pickle_region(path: Path) -> tuple[int, int] | None:
    """Byte range of the pickle inside a torch zip file (its ``data.pkl`` record)."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    except (zipfile.BadZipFile, StopIteration, OSError):
        return None
    raw = path.read_bytes()[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(raw[26:28], "little") + int.from_bytes(raw[28:30], "little")
    return start, start + info.compress_size


def _zip_directory_region(path: Path) -> tuple[int, int] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.start_dir, path.stat().st_size
    except (zipfile.BadZipFile, OSError):
        return None


def _regions(path: Path) -> list[tuple[str, tuple[int, int]]]:
    """Named byte ranges of a file worth damaging (the whole file always among them)."""
    size = path.stat().st_size
    regions = [("anywhere", (0, size))]
    if path.suffix == ".safetensors" and size >= 8:
        regions.append(("safetensors header", (0, min(size, 8 + int.from_bytes(path.read_bytes()[:8], "little")))))
    if path.suffix in (".pt", ".distcp") or path.name == ".metadata":
        pickle_region = _pickle_region(path) if path.suffix == ".pt" else (0, min(size, 4096))
        directory = _zip_directory_region(path) if path.suffix == ".pt" else None
        regions += [(kind, r) for kind, r in (("pickle", pickle_region), ("zip directory", directory)) if r]
    return [(kind, r) for kind, r in regions if r[1] > r[0]]


def _truncate(root: Path, rng: random.Random) -> str:
    path = rng.choice(_files(root))
    offset = rng.randrange(path.stat().st_size) if path.stat().st_size else 0
    with open(path, "r+b") as handle:
        handle.truncate(offset)
    return f"truncate {path.relative_to(root)} at {offset}"


def _flip(root: Path, rng: random.Random) -> str:
    path = rng.choice(_files(root))
    kind, (start, end) = rng.choice(_regions(path)) if path.stat().st_size else ("anywhere", (0, 0))
    data = bytearray(path.read_bytes())
    flipped = sorted(rng.randrange(start, end) for _ in range(rng.randint(1, 4))) if end > start else []
    for offset in flipped:
        data[offset] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return f"flip bytes {flipped} of {path.relative_to(root)} ({kind})"


def _delete(root: Path, rng: random.Random) -> str:
    path = rng.choice(_files(root))
    path.unlink()
    return f"delete {path.relative_to(root)}"


def _renumbered(path: Path, rng: random.Random) -> Path:
    """A sibling name: the first number in the name changed (mp_rank_00 -> mp_rank_01), or a copy suffix."""
    name = path.name if any(c.isdigit() for c in path.name) else path.parent.name
    digits = [i for i, c in enumerate(name) if c.isdigit()]
    if not digits or rng.random() < 0.2:
        return path.with_name(path.name + ".copy")
    i = digits[0]
    new = name[:i] + str((int(name[i]) + 1) % 10) + name[i + 1:]
    return path.with_name(new) if name == path.name else path.parent.with_name(new) / path.name


def _duplicate(root: Path, rng: random.Random) -> str:
    path = rng.choice(_files(root))
    target = _renumbered(path, rng)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return f"duplicate {path.relative_to(root)} as {target.relative_to(root)}"


def _swap(root: Path, rng: random.Random) -> str:
    files = _files(root)
    first = rng.choice(files)
    same_kind = [p for p in files if p.suffix == first.suffix and p != first] or [p for p in files if p != first]
    if not same_kind:
        return "swap nothing"
    second = rng.choice(same_kind)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    return f"swap {first.relative_to(root)} and {second.relative_to(root)}"


FILE_MUTATIONS = (_truncate, _flip, _flip, _delete, _duplicate, _swap)


# ---- field mutations --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Field:
    """One numeric field of a source: ``kind`` says how to read and write it, ``path`` where it is."""

    kind: str  # json, yaml, args, args_first, top, safetensors, dcp
    file: str  # relative to the source root
    path: tuple
    value: Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(node: Any, path: tuple = (), depth: int = 3) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every number in JSON data, down to ``depth`` levels of mappings and lists."""
    if _number(node) and path:
        yield path, node
    elif depth and isinstance(node, (dict, list)):
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            yield from _numbers(value, (*path, key), depth - 1)


def _json_fields(root: Path, file: Path) -> Iterator[Field]:
    for path, value in _numbers(json.loads(file.read_text())):
        yield Field("json", str(file.relative_to(root)), path, value)


def _yaml_fields(root: Path, file: Path) -> Iterator[Field]:
    """Megatron-Bridge's ``run_config.yaml``: every plain value of its model provider (what it says the model is)."""
    model = yaml.safe_load(file.read_text()).get("model", {})
    for key, value in model.items():
        if isinstance(value, (bool, int, float, str)) and key != "_target_":
            yield Field("yaml", str(file.relative_to(root)), ("model", key), value)


def _torch_fields(root: Path, file: Path) -> Iterator[Field]:
    state = torch.load(file, weights_only=False)
    relative = str(file.relative_to(root))
    for key in ("checkpoint_version", "iteration"):
        if _number(state.get(key)):
            yield Field("top", relative, (key,), state[key])
    args = state.get("args")
    for name, value in sorted(vars(args).items()) if args is not None else ():
        if _number(value):
            yield Field("args", relative, (name,), value)
            yield Field("args_first", relative, (name,), value)


def _safetensors_fields(root: Path, file: Path) -> Iterator[Field]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    relative = str(file.relative_to(root))
    yield Field("safetensors", relative, ("__length__",), length)
    header = json.loads(raw[8:8 + length])
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        for key in ("shape", "data_offsets"):
            for i, value in enumerate(entry[key]):
                yield Field("safetensors", relative, (name, key, i), value)
        yield Field("safetensors", relative, (name, "dtype"), entry["dtype"])


def _dcp_fields(root: Path, file: Path) -> Iterator[Field]:
    metadata = pickle.loads(file.read_bytes())
    relative = str(file.relative_to(root))
    for fqn, entry in metadata.state_dict_metadata.items():
        for i, value in enumerate(getattr(entry, "size", ())):
            yield Field("dcp", relative, ("size", fqn, i), value)
        for c, chunk in enumerate(getattr(entry, "chunks", ())):
            for part in ("offsets", "sizes"):
                for i, value in enumerate(getattr(chunk, part)):
                    yield Field("dcp", relative, ("chunk", fqn, c, part, i), value)
    for index, info in metadata.storage_data.items():
        for part in ("offset", "length"):
            yield Field("dcp", relative, ("storage", index.fqn, tuple(index.offset or ()), part), getattr(info, part))


def field_sites(root: Path) -> list[Field]:
    """Every numeric field of a source, in a stable order (args once per tree, from its first file)."""
    fields: list[Field] = []
    args_seen = False
    for file in _files(root):
        if file.name.startswith("tokenizer"):  # copied as they are, never read
            continue
        if file.suffix == ".json":
            fields += _json_fields(root, file)
        elif file.suffix == ".yaml":
            fields += _yaml_fields(root, file)
        elif file.suffix == ".safetensors":
            fields += _safetensors_fields(root, file)
        elif file.name == ".metadata":
            fields += _dcp_fields(root, file)
        elif file.suffix == ".pt" and not args_seen:
            found = list(_torch_fields(root, file))
            args_seen = any(f.kind == "args" for f in found)
            fields += found
    return fields


# safetensors dtypes by item size: another of the same size keeps the data's length right
_SAFETENSORS_DTYPES = {8: ("F64", "I64", "U64"), 4: ("F32", "I32", "U32"), 2: ("F16", "BF16", "I16", "U16"),
                       1: ("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")}


def bad_values(field: Field) -> list[Any]:
    """What a damaged or lying file may hold instead of ``field``'s value."""
    value = field.value
    if field.kind == "safetensors" and field.path[-1] == "dtype":
        size = next(size for size, names in _SAFETENSORS_DTYPES.items() if value in names)
        same = _SAFETENSORS_DTYPES[size]
        return [same[(same.index(value) + 1) % len(same)], "F16" if size == 4 else "F32", "F4"]
    if isinstance(value, bool):
        return [not value, None, "yes"]
    if isinstance(value, str):
        return ["", 0]
    larger = value * 2 + 1 if isinstance(value, int) else value * 10 + 1
    return [0, -1, larger, str(value)]


def _set_at(data: dict, path: tuple, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _apply_field(root: Path, field: Field, value: Any) -> None:
    file = root / field.file
    if field.kind == "json":
        data = json.loads(file.read_text())
        _set_at(data, field.path, value)
        file.write_text(json.dumps(data))
    elif field.kind == "yaml":
        data = yaml.safe_load(file.read_text())
        _set_at(data, field.path, value)
        file.write_text(yaml.safe_dump(data))
    elif field.kind in ("args", "args_first", "top"):
        files = [file] if field.kind != "args" else [p for p in _files(root) if p.suffix == ".pt"]
        for each in files:
            state = torch.load(each, weights_only=False)
            if not isinstance(state, dict) or (field.kind != "top" and "args" not in state):
                continue
            if field.kind == "top":
                state[field.path[0]] = value
            else:
                setattr(state["args"], field.path[0], value)
            torch.save(state, each)
    elif field.kind == "safetensors":
        _apply_safetensors(file, field.path, value)
    else:
        _apply_dcp(file, field.path, value)


def _apply_safetensors(file: Path, path: tuple, value: Any) -> None:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = raw[8:8 + length], raw[8 + length:]
    if path == ("__length__",):
        prefix = (value if isinstance(value, int) else length + 1) % 2**64
        file.write_bytes(prefix.to_bytes(8, "little") + header + data)
        return
    parsed = json.loads(header)
    _set_at(parsed, path, value)
    text = json.dumps(parsed).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _apply_dcp(file: Path, path: tuple, value: Any) -> None:
    metadata = pickle.loads(file.read_bytes())
    def changed(sequence, i):
        items = list(sequence)
        items[i] = value
        return tuple(items)
    if path[0] == "size":
        entry = metadata.state_dict_metadata[path[1]]
        object.__setattr__(entry, "size", changed(entry.size, path[2]))
    elif path[0] == "chunk":
        chunk = metadata.state_dict_metadata[path[1]].chunks[path[2]]
        object.__setattr__(chunk, path[3], changed(getattr(chunk, path[3]), path[4]))
    else:
        info = next(info for index, info in metadata.storage_data.items()
                    if index.fqn == path[1] and tuple(index.offset or ()) == path[2])
        object.__setattr__(info, path[3], value)
    file.write_bytes(pickle.dumps(metadata))


# ---- the commands every damaged source goes through -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Command:
    """One command line run on a damaged copy: ``argv(damaged, original, out, flags)``; the exit codes it may give
    besides 2 (bad input). ``after``: a command that reads exactly as this one does up to where this one goes on
    (when it refused the copy, this one would refuse it alike, and is not run). ``share``: how often one command
    drawn for a CI run is this one, relative to the others."""

    name: str
    run: Callable[[list[str]], int]
    argv: Callable[[Path, Path, Path, tuple], list[str]]
    codes: tuple[int, ...]
    writes: bool = False
    after: str | None = None
    share: int = 5


def _convert(argv: list[str]) -> int:
    return run_convert_cli([*argv, "--quiet"], _bootstrap.FAMILIES)


CONVERT = Command("convert", _convert, lambda src, original, out, flags: [
    "--load_path", str(src), "--save_path", str(out), *flags], (0,), writes=True)
# The commands that read a source and write nothing: convert's dry run, inspect (--check reads every tensor; exit 3
# reports problems such as NaN), verify with the intact original in either order (exit 3: they differ); with
# --logits it builds both models (a quarter of a second: drawn rarely in CI).
READERS = (
    Command("convert --dry_run", _convert, lambda src, original, out, flags: [
        "--load_path", str(src), "--save_path", str(out), *flags, "--dry_run"], (0,)),
    Command("inspect", run_inspect_cli, lambda src, original, out, flags: [str(src)], (0,)),
    Command("inspect --check", run_inspect_cli, lambda src, original, out, flags: [str(src), "--check"],
            (0, EXIT_MISMATCH)),
    Command("verify original damaged", run_verify_cli, lambda src, original, out, flags: [str(original), str(src)],
            (0, EXIT_MISMATCH)),
    Command("verify damaged original", run_verify_cli, lambda src, original, out, flags: [str(src), str(original)],
            (0, EXIT_MISMATCH)),
    Command("verify damaged original --logits", run_verify_cli, lambda src, original, out, flags: [
        str(src), str(original), "--logits"], (0, EXIT_MISMATCH), after="verify damaged original", share=1),
)
CI_DRAW = tuple(command for command in READERS for _ in range(command.share))


def _targets(name: str) -> tuple:
    return HF_TARGETS if name.startswith("hf") else MEGATRON_TARGETS


def _readers(rng: random.Random) -> tuple[Command, ...]:
    """Every reader with FUZZ_READERS=all (FUZZ_EXHAUSTIVE's default), else one (the CI budget)."""
    return READERS if EVERY_READER else (rng.choice(CI_DRAW),)


def _invoke(command: Command, argv: list[str]) -> tuple[int, str]:
    """Run a command in-process as its script would: (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), plain_torch_allowlist():
        code = command.run(argv)
    return code, stderr.getvalue()


def _check(command: Command, code: int, err: str, work: Path, context: str) -> str:
    """Assert one command's outcome: an accepted exit code, no internal error, one error line on bad input;
    return 'ok' or the error line."""
    assert code in (*command.codes, EXIT_BAD_INPUT), context
    assert "Traceback" not in err and "internal error" not in err, context
    assert not list(work.glob(".out.partial-*")), f"a partial output was left: {context}"
    assert code == 0 and command.writes or not (work / "out").exists(), f"an output exists: {context}"
    lines = err.strip().splitlines()
    if code != EXIT_BAD_INPUT:
        assert all(line.startswith("warning: ") for line in lines), context
        return "ok" if code == 0 else f"exit {code}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {context}"
    return lines[0]


def run_damaged(source: Path, damage: Callable[[Path], str], flags: tuple, label: str,
                readers: tuple[Command, ...]) -> dict[str, str]:
    """Copy and damage one source, convert it, then run ``readers`` on it; assert every outcome; return each
    command's 'ok', 'exit N' or error line. The source and its intact original must come out unchanged."""
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        root = work / "src"
        shutil.copytree(source, root)
        what = damage(root)
        before = snapshot(root)
        results: dict[str, str] = {}
        for command in (CONVERT, *readers):
            if command.after in results and results[command.after].startswith("error: "):
                continue
            code, err = _invoke(command, command.argv(root, source, work / "out", flags))
            context = f"{label}: {what}; {command.name} {' '.join(flags)}: exit {code}\n{err}"
            results[command.name] = _check(command, code, err, work, context)
            assert snapshot(root) == before, f"the source changed: {context}"
            assert code != 0 or not command.writes or (work / "out").is_dir(), context
            shutil.rmtree(work / "out", ignore_errors=True)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _file_mutation_numbers() -> list[int]:
    return [int(ONLY)] if ONLY else list(range(MUTATIONS))


@pytest.fixture(scope="module")
def outcomes():
    """What the runs found, printed at the end of the module (``-s`` shows it)."""
    found: dict[str, int] = {}
    yield found
    if found:
        print(f"\nfuzz outcomes (seed {SEED}):", json.dumps(dict(sorted(found.items(), key=lambda kv: -kv[1])), indent=1))


def _count(outcomes: dict, results: dict[str, str]) -> None:
    """Outcomes by command and message (an error line without a path is marked: it names no file)."""
    for command, result in results.items():
        key = f"{command}: " + (result if result in ("ok", f"exit {EXIT_MISMATCH}") else result.split(": ", 2)[-1][:90])
        key += " [names no file]" if result.startswith("error: ") and "/" not in result else ""
        outcomes[key] = outcomes.get(key, 0) + 1


Case = tuple[Path, Callable[[Path], str], tuple, str, tuple[Command, ...]]


def _runs(outcomes: dict, cases: Iterator[Case]) -> None:
    """Run every case; with FUZZ_KEEP_GOING, report all failures at the end instead of the first."""
    failures = []
    for source, damage, flags, label, readers in cases:
        try:
            _count(outcomes, run_damaged(source, damage, flags, label, readers))
        except AssertionError as failure:
            if not KEEP_GOING:
                raise
            failures.append(str(failure).split("\nassert")[0])
            outcomes["FAILED"] = outcomes.get("FAILED", 0) + 1
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


def test_file_mutations(sources, outcomes):
    """Truncated, bit-flipped, deleted, duplicated and swapped files of every format."""
    def cases():
        for number in _file_mutation_numbers():
            rng = random.Random(f"{SEED}-{number}")
            name = rng.choice(sorted(sources))
            mutation, flags = rng.choice(FILE_MUTATIONS), rng.choice(_targets(name))
            readers = _readers(rng)
            yield (sources[name], lambda root, mutation=mutation, rng=rng: mutation(root, rng), flags,
                   f"FUZZ_SEED={SEED} FUZZ_ONLY={number} ({name})", readers)
    _runs(outcomes, cases())


class Sites(dict):
    """Source name -> its fields (a short repr: hypothesis prints its test's arguments)."""

    def __repr__(self) -> str:
        return f"<fields of {len(self)} sources>"


@pytest.fixture(scope="module")
def sites(sources) -> Sites:
    return Sites({name: field_sites(path) for name, path in sources.items()})


@settings(max_examples=FIELD_EXAMPLES, deadline=None, database=None, derandomize=False,
          suppress_health_check=list(HealthCheck))
@hypothesis.seed(SEED)
@given(data=st.data())
def test_field_mutations(sources, sites, outcomes, data):
    """One field of a config, args, header or metadata set to 0, -1, a larger value, a string or another dtype."""
    name = data.draw(st.sampled_from(sorted(sites)), label="source")
    field = data.draw(st.sampled_from(sites[name]), label="field")
    value = data.draw(st.sampled_from(bad_values(field)), label="value")
    flags = data.draw(st.sampled_from(_targets(name)), label="flags")
    readers = READERS if EVERY_READER else (data.draw(st.sampled_from(CI_DRAW), label="reader"),)
    label = f"FUZZ_SEED={SEED} ({name}) {field.kind} {field.file} {field.path} = {value!r}"
    _count(outcomes, run_damaged(sources[name], lambda root: (_apply_field(root, field, value), label)[1], flags,
                                 label, readers))


if EXHAUSTIVE:  # a long run by hand only: the test exists when FUZZ_EXHAUSTIVE=1
    def test_every_field_with_every_bad_value(sources, sites, outcomes):
        def cases():
            for name in sorted(sources):
                for number, field in enumerate(sites[name]):
                    for value in bad_values(field):
                        label = f"({name}) {field.kind} {field.file} {field.path} = {value!r}"
                        flags = _targets(name)[number % len(_targets(name))]
                        yield (sources[name], lambda root, field=field, value=value, label=label: (
                            _apply_field(root, field, value), label)[1], flags, label,
                               _readers(random.Random(f"{SEED}-{label}")))
        _runs(outcomes, cases())


# Mutations that once gave an internal error (exit 1), and the line each command now gives. (source, field kind,
# file, path, value, flags, the command that failed, what its error line says)
FOUND = [
    ("megatron_mcore_tp2_pp2", "args", "release/mp_rank_00_000/model_optim_rng.pt", ("seq_length",), "128",
     MEGATRON_TARGETS[1], "convert", "seq_length is '128', not a whole number"),
    ("hf_deepseek_fp8", "json", "config.json", ("rope_parameters", "beta_slow"), -1, ("--to", "hf"), "convert",
     "config.json: transformers cannot build the DeepseekV3Config model it describes (ValueError: math domain"),
    ("hf_deepseek_fp8", "json", "config.json", ("rope_parameters", "mscale_all_dim"), "1.0", HF_TARGETS[0],
     "verify damaged original --logits", "config.json: transformers cannot build the DeepseekV3Config model"),
    ("megatron_legacy_pp2", "args", "release/mp_rank_00_000/model_optim_rng.pt", ("ffn_hidden_size",), 513,
     MEGATRON_TARGETS[0], "verify damaged original --logits", "ffn_hidden_size is 513, but the tensors fit"),
    ("torch_dist", "dcp", "release/.metadata", ("size", "decoder.layers.mlp.linear_fc1.weight", 1), 385,
     MEGATRON_TARGETS[0], "verify damaged original --logits",
     "common.pt: the architecture it describes does not fit the tensors: layer 0 'mlp.linear_fc1.weight'"),
    ("megatron_mcore_tp2_pp2", "top", "release/mp_rank_00_000/model_optim_rng.pt", ("checkpoint_version",), -1,
     MEGATRON_TARGETS[0], "inspect --check", "checkpoint_version is -1, not a Megatron-LM checkpoint version"),
    ("hf_qwen2_5_vl", "json", "config.json", ("image_token_id",), 0, HF_TARGETS[0], "verify damaged original --logits",
     "config.json: the two models take different fixed inputs (input_ids differ"),
    ("megatron_bridge_vl", "dcp", "iter_0000000/.metadata", ("size", "visual.patch_embed.proj.weight", 0), 65,
     MEGATRON_TARGETS[0], "verify damaged original --logits", "the tensors do not fit the model the architecture "
     "describes (size mismatch for model.visual.patch_embed.proj.weight"),
    ("hf_qwen2_5_vl", "json", "config.json", ("video_token_id",), 10**6, HF_TARGETS[0], "convert",
     "video_token_id is 1000000, not a token id below the vocabulary size"),
]


@pytest.mark.parametrize("source, kind, file, path, value, flags, command, message", FOUND,
                         ids=[f"{case[0]}-{case[3][-1]}-{case[6]}" for case in FOUND])
def test_mutations_that_found_bugs(sources, source, kind, file, path, value, flags, command, message):
    field = Field(kind, file, path, None)
    readers = tuple(reader for reader in READERS if reader.name == command)
    results = run_damaged(sources[source], lambda root: (_apply_field(root, field, value), "")[1], flags,
                          f"({source}) {path} = {value!r}", readers)
    assert message in results[command], results


def test_a_zip_that_claims_several_disks_is_bad_input(sources):
    """A rank file whose zip64 end locator claims another disk (``zipfile`` raises rather than answers "not a zip"
    for it; once an internal error in the MindSpeed-MM layout's test): one error line from every command."""
    def several_disks(root: Path) -> str:
        path = root / "release" / "mp_rank_00" / "model_optim_rng.pt"
        data = bytearray(path.read_bytes())
        locator = data.rindex(b"PK\x06\x07")
        data[locator + 16:locator + 20] = (2).to_bytes(4, "little")  # total number of disks
        path.write_bytes(bytes(data))
        return "zip64 locator: 2 disks"
    readers = tuple(reader for reader in READERS if reader.name in ("convert --dry_run", "inspect"))
    results = run_damaged(sources["megatron_hybrid_tp2"], several_disks, MEGATRON_TARGETS[1], "several disks", readers)
    assert set(results) == {"convert", "convert --dry_run", "inspect"}, results
    assert all("its zip directory is missing" in line for line in results.values()), results
