"""Bad input: one line on stderr naming the problem, exit code 2, the source untouched, no output."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import types

import pytest
import torch

from tests.helpers import convert, reference_megatron_gpt2, tiny_gpt2


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Tiny sources: GPT-2 (HF, Megatron TP2 PP2 local spec, torch_dist), Llama with GQA and an explicit head
    size (HF, Megatron), Mixtral (HF, Megatron EP2)."""
    from tests.test_llama import tiny_llama
    from tests.test_mixtral import tiny_mixtral
    root = tmp_path_factory.mktemp("pristine")
    model = tiny_gpt2(root / "hf")
    reference_megatron_gpt2(model, root / "megatron", tp=2, pp=2, schema="local")
    assert convert("--load_path", root / "hf", "--save_path", root / "dist", "--to", "megatron",
                   "--megatron_ckpt_format", "torch_dist") == 0
    tiny_llama(root / "llama_hf")
    tiny_mixtral(root / "mixtral_hf")
    for family, flags in (("llama", ()), ("mixtral", ("--target_expert_model_parallel_size", "2"))):
        assert convert("--load_path", root / f"{family}_hf", "--save_path", root / f"{family}_megatron",
                       "--to", "megatron", *flags) == 0
    return root


def _rank_file(root, name="mp_rank_00_000"):
    return root / "megatron" / "release" / name / "model_optim_rng.pt"


def _truncate(root):
    path = _rank_file(root)
    path.write_bytes(path.read_bytes()[:1000])


def _empty(root):
    _rank_file(root).write_bytes(b"")


def _not_a_pickle(root):
    _rank_file(root).write_text("hello")


def _remove_rank(root):
    shutil.rmtree(_rank_file(root, "mp_rank_01_001").parent)


def _extra_rank(root):
    shutil.copytree(_rank_file(root, "mp_rank_01_001").parent, root / "megatron" / "release" / "mp_rank_02_001")


def _no_tracker_no_rank_dirs(root):
    (root / "megatron" / "latest_checkpointed_iteration.txt").unlink()


def _tracker_names_missing_iteration(root):
    (root / "megatron" / "latest_checkpointed_iteration.txt").write_text("7")


def _rewrite(root, name, change):
    path = _rank_file(root, name)
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def _missing_args(root):
    _rewrite(root, "mp_rank_00_000", lambda s: s.pop("args"))


def _tp_shape_mismatch(root):
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    _rewrite(root, "mp_rank_01_000", lambda s: s["model"].__setitem__(key, s["model"][key][:-8]))


def _tp_dtype_mismatch(root):
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    _rewrite(root, "mp_rank_01_000", lambda s: s["model"].__setitem__(key, s["model"][key].half()))


def _foreign_global(root):
    module = types.ModuleType("evil_payload")

    class Payload:
        pass
    Payload.__module__, Payload.__qualname__ = "evil_payload", "Payload"
    module.Payload = Payload
    sys.modules["evil_payload"] = module
    try:
        _rewrite(root, "mp_rank_00_000", lambda s: setattr(s["args"], "payload", Payload()))
    finally:
        del sys.modules["evil_payload"]


def _wrong_model_type(root):
    config = root / "hf" / "config.json"
    config.write_text(config.read_text().replace('"gpt2"', '"bert"'))


def _bad_config(root):
    (root / "hf" / "config.json").write_text("{not json")


def _shard_listed_but_missing(root):
    hf = root / "hf"
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_safetensors_header(file, change):
    """Rewrite a safetensors file's JSON header (``change`` edits the parsed dict), keeping its data bytes."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def _unknown_dtype(root):
    _edit_safetensors_header(root / "hf" / "model.safetensors",
                             lambda h: h["transformer.ln_f.weight"].__setitem__("dtype", "F33"))


def _overlapping_offsets(root):
    def overlap(header):
        tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        first, second = header[tensors[0]], header[tensors[1]]
        size = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    _edit_safetensors_header(root / "hf" / "model.safetensors", overlap)


def _as_shards(root, placement):
    """Split the single-file model into two shards plus an index; ``placement(name) -> shard numbers``
    (the index is written as ``placement`` says; see the cases)."""
    from safetensors.torch import load_file, save_file
    hf = root / "hf"
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    names = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
    shards, weight_map = {1: {}, 2: {}}, {}
    for position, (name, tensor) in enumerate(sorted(tensors.items())):
        stored, listed = placement(position, name)
        for shard in stored:
            shards[shard][name] = tensor
        weight_map[name] = names[listed]
    for shard, content in shards.items():
        save_file(content, hf / names[shard], metadata={"format": "pt"})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _same_tensor_in_two_shards(root):
    _as_shards(root, lambda position, name: ((1, 2), 2) if name == "transformer.wte.weight" else
               ((1 + position % 2,), 1 + position % 2))


def _index_disagrees_with_headers(root):
    _as_shards(root, lambda position, name: ((2,), 1) if name == "transformer.wpe.weight" else
               ((1 + position % 2,), 1 + position % 2))


def _zip_end_record_claims_many_disks(root):
    """The zip64 end locator claims two disks: zipfile raises instead of saying 'not a zip' (torch reads on)."""
    path = root / "dist" / "release" / "common.pt"
    data = bytearray(path.read_bytes())
    locator = data.rindex(b"PK\x06\x07")
    data[locator + 16] = 2
    path.write_bytes(bytes(data))


def _chunk_offset_into_another_chunk(root):
    """.metadata sends a chunk's bytes to the middle of another chunk: what is there is no tensor pickle."""
    file = root / "dist" / "release" / ".metadata"
    metadata = pickle.loads(file.read_bytes())
    info = next(info for index, info in metadata.storage_data.items()
                if index.fqn == "decoder.layers.self_attention.linear_qkv.weight" and index.offset[0] == 1)
    info.offset += 30  # there, torch's weights-only unpickler fails with IndexError (at 32: UnicodeDecodeError)
    file.write_bytes(pickle.dumps(metadata))


def _metadata_entry_without_chunks(root):
    """A .metadata pickle that builds a tensor's description without its chunk list (a damaged BUILD)."""
    file = root / "dist" / "release" / ".metadata"
    metadata = pickle.loads(file.read_bytes())
    del vars(metadata.state_dict_metadata["decoder.final_layernorm.weight"])["chunks"]
    file.write_bytes(pickle.dumps(metadata))


def _hostile_dist_metadata(root):
    """A .metadata pickle that would run a shell command (writing into the source) when unpickled."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'dist' / 'pwned'}",))
    (root / "dist" / "release" / ".metadata").write_bytes(pickle.dumps(Payload()))


def _unsupported_dist_backend(root):
    backend = root / "dist" / "release" / "metadata.json"
    backend.write_text(backend.read_text().replace('"torch_dist"', '"zarr"', 1))


def _truncated_distcp(root):
    data = root / "dist" / "release" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:5000])


def _extra_dist_tensor(root, name):
    """A copy of the final norm under ``name``: a model tensor no family table reads, an error, not dropped."""
    file = root / "dist" / "release" / ".metadata"
    metadata = pickle.loads(file.read_bytes())
    metadata.state_dict_metadata[name] = metadata.state_dict_metadata["decoder.final_layernorm.weight"]
    for index, info in list(metadata.storage_data.items()):
        if index.fqn == "decoder.final_layernorm.weight":
            metadata.storage_data[type(index)(name, index.offset)] = info
    file.write_bytes(pickle.dumps(metadata))


def _unknown_dist_tensor(root):
    _extra_dist_tensor(root, "decoder.unknown_norm.weight")


def _mtp_dist_tensor(root):
    """Multi-token prediction layers are refused unless --drop_mtp_layers leaves them out."""
    _extra_dist_tensor(root, "mtp.final_layernorm.weight")


def _nothing(root):
    pass


def _config(source, **changes):
    """Damage: set fields of ``source``'s config.json."""
    def damage(root):
        file = root / source / "config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return damage


def _args(source, **changes):
    """Damage: set fields of the args in every rank file of a Megatron tree (or common.pt of torch_dist)."""
    def damage(root):
        for file in (root / source).rglob("*.pt"):
            state = torch.load(file, weights_only=False)
            for name, value in changes.items():
                setattr(state["args"], name, value)
            torch.save(state, file)
    return damage


MEGATRON_TO_HF = ("--to", "hf")
HF_TO_MEGATRON = ("--to", "megatron")
CASES = [  # (id, source, damage, flags, expected message)
    ("truncated-rank-file", "megatron", _truncate, MEGATRON_TO_HF, "truncated or corrupt checkpoint"),
    ("empty-file", "megatron", _empty, MEGATRON_TO_HF, "file is empty"),
    ("not-a-zip-or-pickle", "megatron", _not_a_pickle, MEGATRON_TO_HF, "not a readable torch checkpoint"),
    ("missing-rank-dir", "megatron", _remove_rank, MEGATRON_TO_HF, "missing rank files for mp_rank_01_001"),
    ("extra-rank-dir", "megatron", _extra_rank, MEGATRON_TO_HF, "unexpected rank directories mp_rank_02_001"),
    ("no-tracker-no-iteration", "megatron", _no_tracker_no_rank_dirs, MEGATRON_TO_HF,
     "no latest_checkpointed_iteration.txt"),
    ("tracker-names-missing-iteration", "megatron", _tracker_names_missing_iteration, MEGATRON_TO_HF,
     "iteration 7 has no mp_rank_* directories"),
    ("missing-args", "megatron", _missing_args, MEGATRON_TO_HF, "has no 'args'"),
    ("args-disagree-with-shapes", "megatron", _args("megatron", hidden_size=96), MEGATRON_TO_HF,
     "model_optim_rng.pt: hidden_size is 96, but the tensors fit hidden_size=64 ('embedding.word_embeddings.weight' "
     "is [1000, 64], not [1000, 96])"),
    ("shape-mismatch-between-tp-ranks", "megatron", _tp_shape_mismatch, MEGATRON_TO_HF,
     "different shapes across TP ranks"),
    ("dtype-mismatch-between-tp-ranks", "megatron", _tp_dtype_mismatch, MEGATRON_TO_HF,
     "different dtypes across TP ranks: [torch.float32, torch.float16]"),
    ("pickle-with-foreign-global", "megatron", _foreign_global, MEGATRON_TO_HF,
     "needs the global 'evil_payload.Payload'"),
    ("torch-dist-hostile-metadata-pickle", "dist", _hostile_dist_metadata, MEGATRON_TO_HF,
     "global 'posix.system' is not checkpoint metadata"),
    ("torch-dist-unsupported-backend", "dist", _unsupported_dist_backend, MEGATRON_TO_HF,
     "sharded backend 'zarr' is not supported"),
    ("torch-dist-truncated-data-file", "dist", _truncated_distcp, MEGATRON_TO_HF,
     "__0_0.distcp: cannot read 'embedding.word_embeddings.weight', the file is truncated or corrupt"),
    ("zip-end-record-claims-many-disks", "dist", _zip_end_record_claims_many_disks, MEGATRON_TO_HF,
     "common.pt: truncated or corrupt checkpoint (its zip directory is missing)"),
    ("torch-dist-chunk-offset-into-another-chunk", "dist", _chunk_offset_into_another_chunk, MEGATRON_TO_HF,
     "__0_0.distcp: cannot read 'decoder.layers.self_attention.linear_qkv.weight', the file is truncated or corrupt"),
    ("torch-dist-metadata-entry-without-chunks", "dist", _metadata_entry_without_chunks, MEGATRON_TO_HF,
     ".metadata: inconsistent torch_dist metadata: AttributeError: 'TensorStorageMetadata' object has no attribute "
     "'chunks'"),
    ("torch-dist-unknown-model-tensor", "dist", _unknown_dist_tensor, MEGATRON_TO_HF,
     "source tensors no conversion rule reads: __0_0.distcp:decoder.unknown_norm.weight"),
    ("torch-dist-mtp-tensor", "dist", _mtp_dist_tensor, MEGATRON_TO_HF,
     "multi-token prediction layers are not converted (mtp.final_layernorm.weight); pass --drop_mtp_layers"),
    ("torch-dist-legacy-schema", "dist", _nothing, (*HF_TO_MEGATRON, "--megatron_format", "legacy"),
     "--megatron_format legacy needs --megatron_ckpt_format torch"),
    ("tp-not-dividing-heads", "megatron", _nothing, ("--to", "megatron", "--target_tensor_model_parallel_size", "3"),
     "tensor parallel size 3 does not divide the 4 attention heads"),
    ("uneven-layers-not-summing", "hf", _nothing, (*HF_TO_MEGATRON, "--target_pipeline_layers", "2,1"),
     "must sum to num_layers=4"),
    ("expert-parallel-without-experts", "hf", _nothing, (*HF_TO_MEGATRON, "--target_expert_model_parallel_size", "2"),
     "needs a mixture-of-experts model"),
    ("family-mismatch", "hf", _nothing, (*HF_TO_MEGATRON, "--model", "llama"), "does not match config.json"),
    ("config-wrong-model-type", "hf", _wrong_model_type, HF_TO_MEGATRON, "model_type 'bert'"),
    ("config-unreadable", "hf", _bad_config, HF_TO_MEGATRON, "unreadable config"),
    ("shard-listed-but-missing", "hf", _shard_listed_but_missing, HF_TO_MEGATRON,
     "shard model-00001-of-00002.safetensors is listed in the index but missing"),
    # every architecture number against the tensors, every direction (class 1), named as the file spells it
    ("config-hidden-size-disagrees", "hf", _config("hf", n_embd=128), HF_TO_MEGATRON,
     "config.json: n_embd is 128, but the tensors fit n_embd=64"),
    ("config-heads-disagree", "llama_hf", _config("llama_hf", num_attention_heads=8), HF_TO_MEGATRON,
     "config.json: num_attention_heads is 8, but the tensors fit num_attention_heads=4"),
    ("config-query-groups-disagree", "llama_hf", _config("llama_hf", num_key_value_heads=4), ("--to", "hf"),
     "config.json: num_key_value_heads is 4, but the tensors fit num_key_value_heads=2"),
    ("config-head-dim-disagrees", "llama_hf", _config("llama_hf", head_dim=16), HF_TO_MEGATRON,
     "config.json: head_dim is 16, but the tensors fit head_dim=24"),
    ("config-ffn-disagrees", "llama_hf", _config("llama_hf", intermediate_size=128), HF_TO_MEGATRON,
     "config.json: intermediate_size is 128, but the tensors fit intermediate_size=96"),
    ("config-vocab-disagrees", "llama_hf", _config("llama_hf", vocab_size=1024), HF_TO_MEGATRON,
     "config.json: vocab_size is 1024, but the tensors fit vocab_size=1000"),
    ("config-fewer-layers-than-tensors", "llama_hf", _config("llama_hf", num_hidden_layers=3), HF_TO_MEGATRON,
     "config.json: num_hidden_layers is 3, but the tensors fit num_hidden_layers=4"),
    ("config-more-layers-than-tensors", "llama_hf", _config("llama_hf", num_hidden_layers=6), HF_TO_MEGATRON,
     "config.json: num_hidden_layers is 6, but the tensors fit num_hidden_layers=4"),
    ("config-experts-disagree", "mixtral_hf", _config("mixtral_hf", num_local_experts=8), HF_TO_MEGATRON,
     "config.json: num_local_experts is 8, but the tensors fit num_local_experts=4"),
    ("args-query-groups-disagree", "llama_megatron", _args("llama_megatron", num_query_groups=4), MEGATRON_TO_HF,
     "model_optim_rng.pt: num_query_groups is 4, but the tensors fit num_query_groups=2"),
    ("args-ffn-disagrees", "llama_megatron", _args("llama_megatron", ffn_hidden_size=128), HF_TO_MEGATRON,
     "model_optim_rng.pt: ffn_hidden_size is 128, but the tensors fit ffn_hidden_size=96"),
    ("args-experts-disagree", "mixtral_megatron", _args("mixtral_megatron", num_experts=8), MEGATRON_TO_HF,
     "model_optim_rng.pt: num_experts is 8, but the tensors fit num_experts=4"),
    ("args-layers-disagree", "llama_megatron", _args("llama_megatron", num_layers=6), MEGATRON_TO_HF,
     "stages hold [4] layers but args say num_layers=6"),
    ("torch-dist-args-disagree", "dist", _args("dist", ffn_hidden_size=512), HF_TO_MEGATRON,
     "common.pt: ffn_hidden_size is 512, but the tensors fit ffn_hidden_size=256"),
    # zero, negative or non-numeric sizes, and numbers that do not divide (class 2)
    ("args-zero-query-groups", "llama_megatron", _args("llama_megatron", num_query_groups=0), MEGATRON_TO_HF,
     "model_optim_rng.pt: num_query_groups is 0, not a whole number of at least 1"),
    ("args-negative-hidden-size", "dist", _args("dist", hidden_size=-1), MEGATRON_TO_HF,
     "common.pt: hidden_size is -1, not a whole number of at least 1"),
    ("args-string-tensor-parallel", "megatron", _args("megatron", tensor_model_parallel_size="2"), MEGATRON_TO_HF,
     "tensor_model_parallel_size is '2', not a whole number of at least 1"),
    ("config-zero-heads", "hf", _config("hf", n_head=0), HF_TO_MEGATRON,
     "config.json: n_head is 0, not a whole number of at least 1"),
    ("config-zero-heads-to-hf", "llama_hf", _config("llama_hf", num_attention_heads=0), ("--to", "hf"),
     "config.json: num_attention_heads is 0, not a whole number of at least 1"),
    ("config-string-heads", "llama_hf", _config("llama_hf", num_attention_heads="4"), HF_TO_MEGATRON,
     "config.json: num_attention_heads is '4', not a whole number of at least 1"),
    ("config-groups-not-dividing-heads", "llama_hf", _config("llama_hf", num_key_value_heads=3), HF_TO_MEGATRON,
     "config.json: num_key_value_heads is 3, which does not divide num_attention_heads=4"),
    ("config-class-refuses", "llama_hf", _config("llama_hf", rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     HF_TO_MEGATRON, "config.json: LlamaConfig cannot read it (KeyError: "),
    ("config-norm-epsilon-string", "llama_hf", _config("llama_hf", rms_norm_eps="small"), HF_TO_MEGATRON,
     "config.json: rms_norm_eps is 'small', not a positive number"),
    ("safetensors-unknown-dtype", "hf", _unknown_dtype, HF_TO_MEGATRON,
     "model.safetensors: invalid safetensors file (Error while deserializing header: invalid JSON in header: "
     "unknown variant `F33`"),
    ("safetensors-overlapping-offsets", "hf", _overlapping_offsets, HF_TO_MEGATRON,
     "model.safetensors: invalid safetensors file (Error while deserializing header: invalid offset for tensor"),
    ("tensor-in-two-shards", "hf", _same_tensor_in_two_shards, HF_TO_MEGATRON,
     "model.safetensors.index.json: tensor 'transformer.wte.weight' is in two shards, "
     "model-00001-of-00002.safetensors and model-00002-of-00002.safetensors"),
    ("index-disagrees-with-shard-headers", "hf", _index_disagrees_with_headers, HF_TO_MEGATRON,
     "model.safetensors.index.json: weight_map puts 'transformer.wpe.weight' in model-00001-of-00002.safetensors, "
     "but it is in model-00002-of-00002.safetensors"),
]


@pytest.mark.parametrize("source,damage,flags,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_source_untouched(pristine, tmp_path, capsys, source, damage, flags, message):
    shutil.copytree(pristine, tmp_path / "src")
    damage(tmp_path / "src")
    before = snapshot(tmp_path / "src")
    assert convert("--load_path", tmp_path / "src" / source, "--save_path", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and "\n" not in err, err
    assert snapshot(tmp_path / "src") == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_not_enough_disk_space_fails_before_writing(pristine, tmp_path, capsys, monkeypatch):
    import collections
    from checkpoint_convert.run import output
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    assert convert("--load_path", pristine / "hf", "--save_path", tmp_path / "out", "--to", "megatron") == 2
    assert "GiB but only 0.00 GiB are free" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_save_path_inside_load_path_and_non_empty_save_path(pristine, tmp_path, capsys):
    shutil.copytree(pristine, tmp_path / "src")
    assert convert("--load_path", tmp_path / "src/hf", "--save_path", tmp_path / "src/hf/out", "--to", "megatron") == 2
    assert "must not equal, contain or lie inside the load path" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert convert("--load_path", tmp_path / "src/hf", "--save_path", tmp_path / "full", "--to", "megatron") == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err


def test_overwrite_replaces_a_checkpoint_once_the_new_one_is_complete(pristine, tmp_path, monkeypatch):
    assert convert("--load_path", pristine / "hf", "--save_path", tmp_path / "out", "--to", "hf") == 0
    seen_during_the_stream = []
    from checkpoint_convert.run import converter
    stream = converter._stream
    monkeypatch.setattr(converter, "_stream", lambda *a, **k: (
        seen_during_the_stream.append(sorted(p.name for p in (tmp_path / "out").iterdir())), stream(*a, **k))[1])
    assert convert("--load_path", pristine / "megatron", "--save_path", tmp_path / "out", "--to", "megatron",
                   "--overwrite") == 0
    assert seen_during_the_stream == [["config.json", "conversion.json", "generation_config.json", "model.safetensors"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert not list(tmp_path.glob(".out.*"))


def _thesis(root):
    (root / "docs").mkdir()
    (root / "docs" / "thesis.txt").write_text("four years")


@pytest.mark.parametrize("holds, message", [
    (_thesis, "it would delete docs/thesis.txt"),
    (lambda root: (root / "notes.md").write_text("x"), "it would delete notes.md"),
    (lambda root: (root / "config.json").write_text("{}"), "config.json, which belongs to no complete checkpoint"),
], ids=["thesis-beside-nothing", "notes", "config-without-weights"])
def test_overwrite_refuses_a_directory_holding_anything_but_a_checkpoint(pristine, tmp_path, capsys, holds, message):
    (tmp_path / "out").mkdir()
    holds(tmp_path / "out")
    before = snapshot(tmp_path / "out")
    assert convert("--load_path", pristine / "hf", "--save_path", tmp_path / "out", "--to", "megatron",
                   "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert snapshot(tmp_path / "out") == before


def test_overwrite_refuses_a_checkpoint_with_a_stray_file(pristine, tmp_path, capsys):
    shutil.copytree(pristine / "megatron", tmp_path / "out")
    (tmp_path / "out" / "release" / "mp_rank_00_000" / "notes.txt").write_text("x")
    assert convert("--load_path", pristine / "hf", "--save_path", tmp_path / "out", "--to", "megatron",
                   "--overwrite") == 2
    assert "it would delete release/mp_rank_00_000/notes.txt" in capsys.readouterr().err
    assert (tmp_path / "out" / "release" / "mp_rank_00_000" / "notes.txt").exists()


@pytest.mark.parametrize("where", ["working", "home"])
def test_the_working_and_home_directories_are_never_replaced(pristine, tmp_path, capsys, monkeypatch, where):
    """Nor any directory containing them."""
    (tmp_path / "top" / "me").mkdir(parents=True)
    if where == "working":
        monkeypatch.chdir(tmp_path / "top" / "me")
    else:
        monkeypatch.setenv("HOME", str(tmp_path / "top" / "me"))
    for save in (tmp_path / "top" / "me", tmp_path / "top"):
        assert convert("--load_path", pristine / "hf", "--save_path", save, "--to", "megatron", "--overwrite") == 2
        assert f"is or contains the {where} directory" in capsys.readouterr().err
    assert (tmp_path / "top" / "me").is_dir() and not list((tmp_path / "top" / "me").iterdir())


@pytest.mark.parametrize("script, argv", [
    ("scripts/inspect_checkpoint.py", ["{megatron}"]), ("scripts/verify.py", ["{hf}", "{megatron}"]),
    ("scripts/convert.py", ["--load_path", "{hf}", "--to", "hf", "--save_path", "{out}"]),
    ("megatron_gpt2/checkpoint_reshaping_and_interoperability.py",
     ["--load_path", "{megatron}", "--save_path", "{out}", "--convert_checkpoint_from_megatron_to_transformers",
      "--print-checkpoint-structure", "--quiet"]),
    ("scripts/make_tiny.py", ["--out", "{out}"]), ("scripts/demo.py", []),
    ("scripts/benchmark.py", ["--sizes", "0.01", "--real_shapes_layers", "0", "--repeats", "1", "--workdir", "{tmp}"])],
    ids=["inspect", "verify", "convert", "drop-in", "make_tiny", "demo", "benchmark"])
def test_cli_whose_reader_goes_away_exits_quietly(pristine, tmp_path, script, argv):
    """``inspect_checkpoint.py PATH | head`` where the reader has gone before the first line: no traceback,
    no complaint, the exit status a shell gives a tool stopped by SIGPIPE."""
    import subprocess

    from tests.helpers import REPO
    paths = [arg.format(hf=pristine / "hf", megatron=pristine / "megatron", out=tmp_path / "out", tmp=tmp_path)
             for arg in argv]
    command = " ".join(f'"{part}"' for part in [sys.executable, REPO / script, *paths])
    result = subprocess.run(["bash", "-c", f'{command} | true; echo "status ${{PIPESTATUS[0]}}" >&2'],
                            capture_output=True, text=True, timeout=300)
    *before, status = result.stderr.strip().splitlines()
    assert status == "status 141" and not any("rror" in line or "Traceback" in line for line in before), result.stderr


def test_output_directory_gets_the_mode_mkdir_would_give(pristine, tmp_path):
    (tmp_path / "plain").mkdir()
    assert convert("--load_path", pristine / "hf", "--save_path", tmp_path / "out", "--to", "megatron") == 0
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_megatron_classes_in_args_load_as_inert_stand_ins(pristine, tmp_path):
    """Args holding an object of a Megatron class from a module that is not installed."""
    shutil.copytree(pristine, tmp_path / "src")
    module = types.ModuleType("megatron.not_installed_here")

    class AttnBackendLike:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return (AttnBackendLike, (self.value,))
    AttnBackendLike.__module__, AttnBackendLike.__qualname__ = "megatron.not_installed_here", "AttnBackendLike"
    module.AttnBackendLike = AttnBackendLike
    sys.modules["megatron.not_installed_here"] = module
    try:
        for name in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
            _rewrite(tmp_path / "src", name, lambda s: setattr(s["args"], "attention_backend", AttnBackendLike(5)))
    finally:
        del sys.modules["megatron.not_installed_here"]
    from checkpoint_convert.formats.safe_load import ForeignObject, safe_torch_load
    args = safe_torch_load(_rank_file(tmp_path / "src"))["args"]
    assert isinstance(args, argparse.Namespace) and isinstance(args.attention_backend, ForeignObject)
    assert args.attention_backend.value == 5 and "megatron.not_installed_here" in repr(args.attention_backend)
    assert convert("--load_path", tmp_path / "src" / "megatron", "--save_path", tmp_path / "out", "--to", "hf") == 0


def test_safe_loading_leaves_the_process_allowlist_as_it_found_it(tmp_path):
    """A library in the same process (megatron-core allows argparse.Namespace on import) keeps what it allowed:
    our loads add their entries for the call only."""
    from checkpoint_convert.formats.safe_load import safe_torch_load
    from tests.helpers import plain_torch_allowlist
    torch.save({"args": argparse.Namespace(x=1)}, tmp_path / "f.pt")
    with plain_torch_allowlist():
        torch.serialization.add_safe_globals([argparse.Namespace])
        assert safe_torch_load(tmp_path / "f.pt")["args"].x == 1
        assert torch.serialization.get_safe_globals() == [argparse.Namespace]
        torch.serialization.clear_safe_globals()
        assert safe_torch_load(tmp_path / "f.pt")["args"].x == 1
        assert torch.serialization.get_safe_globals() == []


def test_nan_weights_warn_but_convert(pristine, tmp_path, capsys):
    shutil.copytree(pristine, tmp_path / "src")
    key = "decoder.layers.0.mlp.linear_fc2.weight"

    def poison(state):
        state["model"][key][0, 0] = float("nan")
    _rewrite(tmp_path / "src", "mp_rank_00_000", poison)
    assert convert("--load_path", tmp_path / "src/megatron", "--save_path", tmp_path / "out", "--to", "hf") == 0
    assert "layer 0 'mlp.linear_fc2.weight' contains NaN or Inf values" in capsys.readouterr().err


def test_killed_conversion_never_leaves_a_complete_looking_output(tmp_path):
    """SIGKILL at several points: the save path is absent or complete, and a rerun succeeds."""
    import signal
    import subprocess
    import time

    from tests.helpers import REPO
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=20000, n_positions=64)).save_pretrained(
        tmp_path / "hf")
    command = [sys.executable, str(REPO / "scripts" / "convert.py"), "--load_path", str(tmp_path / "hf"),
               "--save_path", str(tmp_path / "out"), "--to", "megatron", "--target_tensor_model_parallel_size", "2",
               "--target_pipeline_model_parallel_size", "2", "--quiet"]
    for delay in (0.5, 2.0, 3.0, 3.5, 4.0, 5.0):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        process = subprocess.Popen(command)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        out = tmp_path / "out"
        assert not out.exists() or (out / "latest_checkpointed_iteration.txt").is_file()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert subprocess.run(command).returncode == 0
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").is_file()
    assert not list(tmp_path.glob(".out.partial-*")), "a rerun removes stale partial directories"


def test_expected_shapes_come_from_megatron_module_names_alone():
    """The shape check knows megatron-core's modules, not families: a family's qk norms (head size wide) and
    shared experts (hidden wide, of their own ffn size, left open when the architecture has none) get checked
    without a rule of their own."""
    from checkpoint_convert.model.arch import ModelArch
    from checkpoint_convert.engine.streams import Item
    from checkpoint_convert.model.family import Param
    from checkpoint_convert.model.parallel import Style
    from checkpoint_convert.engine.shape_check import expected_shape
    arch = ModelArch(family="x", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     kv_channels=24, ffn_hidden_size=96, vocab_size=1000, max_position_embeddings=128,
                     activation="swiglu", num_experts=8, moe_ffn_hidden_size=32)

    def shape(name, experts=False):
        return expected_shape(Item("layer", Param(name, ("x",), Style.REPLICATED, experts=experts), 0), arch)
    assert shape("self_attention.linear_qkv.weight") == ((4 + 2 * 2) * 24, 64)
    assert shape("self_attention.linear_proj.weight") == (64, 4 * 24)
    assert shape("self_attention.q_layernorm.weight") == shape("self_attention.k_layernorm.weight") == (24,)
    assert shape("input_layernorm.weight") == shape("pre_mlp_layernorm.bias") == (64,)
    assert shape("mlp.linear_fc1.weight") == (2 * 96, 64) and shape("mlp.linear_fc2.weight") == (64, 96)
    assert shape("mlp.router.weight") == (8, 64)
    assert shape("mlp.experts.local_experts.{expert}.linear_fc1.weight", experts=True) == (8, 2 * 32, 64)
    assert shape("mlp.shared_experts.linear_fc1.weight") == (None, 64)
    assert shape("mlp.shared_experts.linear_fc2.weight") == (64, None)
    arch = arch.replace(moe_shared_expert_intermediate_size=48)
    assert shape("mlp.shared_experts.linear_fc1.weight") == (2 * 48, 64)
    assert shape("mlp.shared_experts.linear_fc2.weight") == (64, 48) and shape("mlp.shared_experts.gate_weight") == (1, 64)
    assert shape("mtp.some_new_module.weight") is None  # unknown: left to the walk
