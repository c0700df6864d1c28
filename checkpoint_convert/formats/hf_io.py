"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors or .bin shards).

Reading is lazy: safetensors and ``.bin`` files are memory-mapped (privately: the source can never be
written through the mapping), so a tensor's bytes are read only when it is converted; the engine hands
the mapped pages back to the kernel once a tensor is converted (``memory.release_pages``). Writing streams: each
safetensors shard's header is written first from the planned shapes and dtypes, then tensors are
appended one by one as the conversion produces them, so no shard is ever assembled in memory.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, Container, Iterable

import torch
from huggingface_hub import constants, split_state_dict_into_shards_factory
from safetensors import safe_open

from ..base.errors import BadInputError, reason
from ..base.memory import map_for_reading
from . import mxfp4
from .safe_load import safe_torch_load
from .sinks import DISK, DiskSink

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",  # FP8: block-quantized output (``quantize_blocks``)
}
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
# read, never written: what else the safetensors format stores and torch has
_TORCH_DTYPES.update({code: getattr(torch, name) for code, name in (
    ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64")) if hasattr(torch, name)})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "vocab.txt")


def is_hf_checkpoint(path: Path) -> bool:
    return (path / CONFIG).is_file()


def read_config(path: Path) -> dict[str, Any]:
    return _special_floats(read_json_object(path / CONFIG, "config"))


_FLOAT_TAGS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_floats(value: Any) -> Any:
    """config.json's floats JSON cannot spell, as transformers writes them (``{"__float__": "Infinity"}``, e.g.
    Nemotron-H's ``time_step_limit``), back as floats: what ``from_pretrained`` hands its config class."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {key: _special_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_special_floats(item) for item in value]
    return value


def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """A JSON file holding an object; anything else is bad input naming ``what`` the file should be."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise BadInputError(f"unreadable {what} ({error})", file)
    if not isinstance(value, dict):
        raise BadInputError(f"{what} is not a JSON object", file)
    return value


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from an index or a single weights file."""
    for index_name, single in ((constants.SAFETENSORS_INDEX_FILE, constants.SAFETENSORS_SINGLE_FILE),
                               (PYTORCH_INDEX_FILE, constants.PYTORCH_WEIGHTS_NAME)):
        index = path / index_name
        if index.is_file():
            return _indexed_weight_map(path, index)
        if (path / single).is_file():
            return {name: path / single for name in _names_in(path / single)}
    raise BadInputError("no model.safetensors, pytorch_model.bin or index next to config.json", path)


def _indexed_weight_map(path: Path, index: Path) -> dict[str, Path]:
    """An index's ``weight_map``, which must say what the shards' own headers say: every tensor in the
    shard it names, each tensor in one shard only, no shard tensor left out."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("weight_map is not a map of tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInputError(f"unreadable index ({error})", index)
    holder: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or not (path / shard).is_file():
            raise BadInputError(f"shard {shard} is listed in the index but missing", index)
        for name in _names_in(path / shard):
            if name in holder:
                raise BadInputError(f"tensor '{name}' is in two shards, {holder[name]} and {shard}", index)
            holder[name] = shard
    for name, shard in weight_map.items():
        if holder.get(name) != shard:
            where = f"in {holder[name]}" if name in holder else "in no shard"
            raise BadInputError(f"weight_map puts '{name}' in {shard}, but it is {where}", index)
    unlisted = sorted(set(holder) - set(weight_map))
    if unlisted:
        raise BadInputError(f"{holder[unlisted[0]]} holds '{unlisted[0]}', which weight_map does not list", index)
    return {tensor: path / name for tensor, name in weight_map.items()}


def _names_in(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        return list(SafetensorsReader(file).keys())
    state = safe_torch_load(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError("not a state dict of tensors", file)
    return list(state.keys())


def _validate_safetensors(file: Path) -> None:
    """The safetensors library's own checks of a file's header, which it reads without the data: known
    dtypes, each tensor's bytes matching its shape, offsets covering the data exactly once in order (no
    overlap, no gap), the file neither shorter nor longer than the header says."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except Exception as error:  # SafetensorError, OSError, ...: the library's one-line reason
        raise BadInputError(f"invalid safetensors file ({reason(error).split(': ', 1)[-1]})", file)


def _refuse_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique (``json`` keeps the last of duplicates silently)."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"the header names '{next(n for n in names if names.count(n) > 1)}' twice")
    return dict(pairs)


class SafetensorsReader:
    """Reads one safetensors file tensor by tensor, through a private memory map.

    Each tensor is a view of the mapping: no copy, no zero-filled buffer. Pages read through a
    mapping stay in the process's resident memory until they are handed back, so the engine releases
    them after each tensor (``safetensors.safe_open`` offers no such hook, and converting a whole model
    through it makes the process as large as the model). The format is the documented one: an 8-byte
    little-endian header length, a JSON header of dtype/shape/data_offsets, then the data.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        _validate_safetensors(file)
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            try:
                header = json.loads(handle.read(length), object_pairs_hook=_refuse_duplicate_names)
            except ValueError as error:
                raise BadInputError(f"invalid safetensors file ({error})", file)
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + length
        self._map: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def _dtype(self, name: str) -> torch.dtype:
        code = self.header[name]["dtype"]
        if code not in _TORCH_DTYPES:
            raise BadInputError(f"tensor '{name}' has dtype {code}, which this tool does not read", self.file)
        return _TORCH_DTYPES[code]

    def meta(self, name: str) -> torch.Tensor:
        return torch.empty(self.header[name]["shape"], dtype=self._dtype(name), device="meta")

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._map = map_for_reading(self.file)
        return self._map

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        dtype = self._dtype(name)
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        view = memoryview(self._mapping())[self.data_start + begin:self.data_start + end]
        return torch.frombuffer(view, dtype=dtype).reshape(entry["shape"])


SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: ``X.weight_scale_inv`` beside ``X.weight``
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def fp8_block_size(config: dict[str, Any], source: Path | None = None) -> tuple[int, int]:
    """The quantization blocks of an FP8 checkpoint: config.json's ``quantization_config.weight_block_size``
    (DeepSeek-V3's 128 x 128 when it says none); ``source``: the directory whose config it is, for messages."""
    quantization = config.get("quantization_config") or {}
    block = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
    if block is None:
        return 128, 128
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):
        raise BadInputError(f"quantization_config.weight_block_size is {block!r}, not two positive whole numbers",
                            source / CONFIG if source else None)
    return int(block[0]), int(block[1])


def block_grid(shape: Iterable[int], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a 2-D weight quantized in ``block``s: one scale per block, the last ones partial."""
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def _block_rows_per_step(block: tuple[int, int], cols: int) -> int:
    """Rows of one step of a blockwise pass: whole block rows, about ``_DEQUANTIZE_CHUNK`` elements of float32."""
    return block[0] * max(1, _DEQUANTIZE_CHUNK // (block[0] * max(cols, 1)))


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (FP8) times the scale of its ``block`` (the last blocks may be partial), as ``dtype``.

    The format's definition (DeepSeek-V3's ``fp8_cast_bf16``): element (i, j) is ``weight[i, j] *
    scale_inv[i // block[0], j // block[1]]``. In float32, a run of whole block rows (about 16 MB) at a
    time, each scale applied to its columns through a view: the only weight-sized allocation is the result.
    """
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=dtype)
    whole = cols // block[1]  # column blocks of full width
    step = _block_rows_per_step(block, cols)
    for start in range(0, rows, step):
        part = weight[start:start + step].float()
        scales = scale_inv[start // block[0]:(start + step) // block[0]].float()
        scales = scales.repeat_interleave(block[0], dim=0)[:len(part)]
        part[:, :whole * block[1]].view(len(part), whole, block[1]).mul_(scales[:, :whole, None])
        part[:, whole * block[1]:].mul_(scales[:, whole:])
        out[start:start + step] = part
    return out


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``float8_e4m3fn`` weight, float32 ``weight_scale_inv``): the inverse of :func:`dequantize_blocks`.

    Each block's scale is its largest magnitude over E4M3's largest value (``amax / 448``, DeepSeek-V3's
    rule), so the block's largest weight becomes +-448; ``weight_scale_inv`` stores that scale, the factor
    a reader multiplies by (its name: the inverse of the quantizing factor ``448 / amax``). A block of zeros
    gets scale 1, as transformers' own quantizer gives it. Values are divided in float32 and rounded to the
    nearest E4M3 value. A block holding NaN or Inf has no scale: refused, naming ``name`` and the block.
    Whole block rows (about 16 MB of float32) at a time; the source is never written.
    """
    rows, cols = weight.shape
    grid = block_grid(weight.shape, block)
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(grid, dtype=torch.float32)
    step = _block_rows_per_step(block, cols)
    for start in range(0, rows, step):
        part = weight[start:start + step]
        tiles = torch.zeros(-(-len(part) // block[0]) * block[0], grid[1] * block[1], dtype=torch.float32)
        tiles[:len(part), :cols] = part
        tiles = tiles.view(-1, block[0], grid[1], block[1])
        amax = tiles.abs().amax(dim=(1, 3))
        _refuse_not_finite(amax, name, start // block[0])
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        tiles.div_(scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
        out[start:start + step] = tiles.view(-1, grid[1] * block[1])[:len(part), :cols]
        scales[start // block[0]:start // block[0] + len(scale)] = scale
    return out, scales


def _refuse_not_finite(amax: torch.Tensor, name: str, first_row: int) -> None:
    """A block whose largest magnitude is NaN or Inf holds such a value: no FP8 scale represents it."""
    bad = (~torch.isfinite(amax)).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        raise BadInputError(f"'{name}' holds NaN or Inf in its block ({first_row + row}, {col}); "
                            "FP8 block quantization cannot represent it")


_DEQUANTIZE_CHUNK = 1 << 22  # elements of float32 work per step


class HFCheckpoint:
    """A Hugging Face model directory, read one tensor at a time.

    An FP8 weight with a ``weight_scale_inv`` companion (block-quantized checkpoints such as DeepSeek-V3's)
    reads as its dequantized values in ``dequantized_dtype`` (bf16 unless the conversion asks for another);
    the scale is read with it and is no tensor of its own.
    Likewise MXFP4 pairs (``X_blocks`` and ``X_scales``, gpt-oss) read as ``X`` (see ``mxfp4``).
    """

    def __init__(self, path: Path, trust: bool = False) -> None:
        self.path = path
        self.trust = trust
        self.config = read_config(path)
        self.weight_map = _weight_map(path)
        self._handles: dict[Path, Any] = {}
        self.aliases: dict[str, tuple[list[str], Any]] = {}
        self.read: list[torch.Tensor] = []  # stored tensors read (memory-mapped) since the caller last cleared it
        self.scales = {name[:-len(SCALE_SUFFIX)]: name for name in self.weight_map
                       if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.weight_map}
        self.dequantized_dtype = torch.bfloat16
        if mxfp4.is_mxfp4(self.config):  # X_blocks and X_scales read as X, dequantized
            self.add_aliases(mxfp4.aliases(self.names(), self.stored_meta, lambda: self.dequantized_dtype, self.path))

    @property
    def tokenizer_dir(self) -> Path | None:
        """This directory, when it holds tokenizer files (Hugging Face models usually do)."""
        return self.path if tokenizer_files(self.path) else None

    def add_aliases(self, aliases: dict[str, tuple[list[str], Any]]) -> None:
        """Expose tensors of an older layout under current names: {name: (stored names, combine)}."""
        self.aliases.update(aliases)

    def stored_names(self, name: str) -> list[str]:
        if name in self.aliases:
            return [stored for source in self.aliases[name][0] for stored in self.stored_names(source)]
        return [name, self.scales[name]] if name in self.scales else [name]

    def _check_quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scale) ``meta`` tensors of a block-quantized weight, checked against each other."""
        weight, scale = self.stored_meta(name), self.stored_meta(self.scales[name])
        block = fp8_block_size(self.config, self.path)
        if weight.dtype not in FP8_DTYPES or weight.dim() != 2 or tuple(scale.shape) != block_grid(weight.shape, block):
            raise BadInputError(f"'{name}' ({weight.dtype}, {list(weight.shape)}) and its scale "
                                f"{list(scale.shape)} are not FP8 blocks of {block[0]} x {block[1]}", self.path)
        return weight, scale

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            if file.suffix == ".safetensors":
                self._handles[file] = SafetensorsReader(file)
            else:
                self._handles[file] = safe_torch_load(file, trust=self.trust)
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _file_for(self, name: str) -> Path:
        if name not in self.weight_map:
            raise BadInputError(f"tensor '{name}' is missing", self.path)
        return self.weight_map[name]

    def meta(self, name: str) -> torch.Tensor:
        """A ``meta`` tensor with the stored shape and dtype (dequantized: ``dequantized_dtype``); reads no data."""
        if name in self.aliases:
            sources, combine = self.aliases[name]
            return combine([self.meta(source) for source in sources])
        if name in self.scales:
            return torch.empty(self._check_quantized(name)[0].shape, dtype=self.dequantized_dtype, device="meta")
        return self._unscaled(name, self.stored_meta(name))

    def stored_meta(self, name: str) -> torch.Tensor:
        """A stored tensor's shape and dtype as the file holds it (an FP8 weight as FP8)."""
        file = self._file_for(name)
        handle = self._handle(file)
        if file.suffix == ".safetensors":
            return handle.meta(name)
        return torch.empty_like(handle[name], device="meta")

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.aliases:
            sources, combine = self.aliases[name]
            return combine([self.tensor(source) for source in sources])
        if name in self.scales:
            self._check_quantized(name)
            weight, scale = self._stored(name), self._stored(self.scales[name])
            return dequantize_blocks(weight, scale, fp8_block_size(self.config, self.path), self.dequantized_dtype)
        return self._unscaled(name, self._stored(name))

    def _unscaled(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """A tensor without a scale beside it, as stored; in a block-quantized checkpoint an FP8 one is refused:
        its scale is missing, and its raw values are not the weights."""
        if stored.dtype in FP8_DTYPES and self.config.get("quantization_config"):
            raise BadInputError(f"'{name}' is {stored.dtype} without its '{name}{SCALE_SUFFIX}' beside it, in a "
                                "checkpoint whose quantization_config says its FP8 weights are block-scaled", self.path)
        return stored

    def _stored(self, name: str) -> torch.Tensor:
        file = self._file_for(name)
        handle = self._handle(file)
        tensor = handle.get_tensor(name) if file.suffix == ".safetensors" else handle[name]
        self.read.append(tensor)
        return tensor


class SafetensorsStreamWriter:
    """Writes a safetensors file whose header is known up front, filled tensor by tensor.

    The layout is the one ``safetensors`` itself writes: an 8-byte little-endian header length,
    the JSON header padded with spaces to 8 bytes, then the tensors' bytes in header order.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 sink: DiskSink = DISK) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order = []
        for name, shape, dtype in entries:
            size = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._order.append((name, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = sink.appender(path)
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._next = 0
        self.path = path

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, size = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"{self.path}: got {name} while expecting {expected}")
        if tensor.nbytes != size:
            raise RuntimeError(f"{self.path}: {name} has {tensor.nbytes} bytes, planned {size}")
        self._file.write_tensor(tensor)
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def close(self) -> None:
        self._file.close()


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes a tensor of this shape and dtype occupies."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=dtype).element_size()


def shard_split(planned: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: str | int,
                safe_serialization: bool = True) -> Any:
    """The shards ``save_pretrained`` would cut the planned tensors into (huggingface_hub's ``StateDictSplit``)."""
    pattern = (constants.SAFETENSORS_WEIGHTS_FILE_PATTERN if safe_serialization
               else constants.PYTORCH_WEIGHTS_FILE_PATTERN)
    # The generic splitter on (shape, dtype) entries: the torch one imports torch.distributed.tensor
    # (about 1 s) to recognise DTensors, which planned entries never are.
    entries = {name: (shape, dtype) for name, shape, dtype in planned}
    return split_state_dict_into_shards_factory(entries, get_storage_size=lambda entry: tensor_nbytes(*entry),
                                                filename_pattern=pattern, max_shard_size=max_shard_size)


class HFWriter:
    """Writes planned tensors into shards named and indexed as ``save_pretrained`` does.

    ``files``: the shards this process writes when several processes share a conversion (None: all of them).
    """

    def __init__(self, root: Path, planned: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: str | int, safe_serialization: bool = True, sink: DiskSink = DISK,
                 files: Container[str] | None = None) -> None:
        self.root, self.sink = root, sink
        self.safe = safe_serialization
        self.split = shard_split(planned, max_shard_size, safe_serialization)
        self.file_of = self.split.tensor_to_filename
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._writers: dict[str, SafetensorsStreamWriter] = {}
        for file_name in self.split.filename_to_tensors:
            if files is not None and file_name not in files:
                continue
            entries = [(name, shape, dtype) for name, shape, dtype in planned if self.file_of[name] == file_name]
            if safe_serialization:
                self._writers[file_name] = SafetensorsStreamWriter(root / file_name, entries, sink)
            else:
                self._pending[file_name] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file_name = self.file_of[name]
        if self.safe:
            self._writers[file_name].write(name, tensor)
            return
        shard = self._pending[file_name]
        shard[name] = tensor.clone()
        if len(shard) == len(self.split.filename_to_tensors[file_name]):
            self.sink.torch_save(shard, self.root / file_name)
            shard.clear()

    def close_files(self) -> None:
        """Close this writer's shards, each of which must hold every tensor planned for it."""
        for writer in self._writers.values():
            writer.close()
            if not writer.complete:
                raise RuntimeError(f"{writer.path}: not every planned tensor was written")

    def finish(self, parts: list[Any] | None = None) -> None:
        """The index of every shard (whichever process wrote them), when there are several."""
        if self.split.is_sharded:
            index_name = constants.SAFETENSORS_INDEX_FILE if self.safe else PYTORCH_INDEX_FILE
            index = {"metadata": dict(self.split.metadata), "weight_map": dict(sorted(self.file_of.items()))}
            self.sink.write_text(self.root / index_name, json.dumps(index, indent=2) + "\n")


def copy_tokenizer(source_dir: str | None, target: Path, sink: DiskSink = DISK) -> list[str]:
    """Copy tokenizer files from a local directory (no hub access); returns the names copied."""
    if not source_dir:
        return []
    source = Path(source_dir)
    if not source.is_dir():
        raise BadInputError("--tokenizer_name must be a local directory", source)
    copied = tokenizer_files(source)
    if not copied:
        raise BadInputError("no tokenizer files found", source)
    for name in copied:
        sink.copy(source / name, target / name)
    return copied


def tokenizer_files(directory: Path) -> list[str]:
    """The Hugging Face tokenizer files in ``directory``."""
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]

