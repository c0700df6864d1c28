"""The write-behind thread, page release and process exit: what makes streaming fast must not change results."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import REPO, assert_logits_close, convert, logits_of, tiny_gpt2

from checkpoint_convert.run import converter
from checkpoint_convert.base import memory
from checkpoint_convert.engine import sources
from checkpoint_convert.base.errors import BadInputError
from checkpoint_convert.formats.hf_io import SafetensorsReader
from checkpoint_convert.engine.write_behind import WriteBehind


def _slow_recorder(log: list, delay: float = 0.01):
    def write(key, tensor):
        time.sleep(delay)
        log.append((key, tensor.clone()))
    return write


def test_write_behind_writes_in_order_and_bounds_queued_bytes_when_asked_for_room():
    written: list = []
    queued, most = [0], [0]
    lock = threading.Lock()
    recorder = _slow_recorder(written)

    def write(key, tensor):
        recorder(key, tensor)
        with lock:
            queued[0] -= tensor.nbytes

    tensors = [torch.full((n,), float(i)) for i, n in enumerate([100, 10, 10, 100, 50, 50, 100, 1, 100])]
    limit = 100 * 4
    with WriteBehind(write, limit) as behind:
        for i, tensor in enumerate(tensors):
            behind.wait_for_room(tensor.nbytes)
            behind.submit(i, tensor)
            with lock:
                queued[0] += tensor.nbytes
                most[0] = max(most[0], queued[0])
    assert [key for key, _ in written] == list(range(len(tensors)))
    assert all(torch.equal(t, tensors[key]) for key, t in written)
    assert most[0] <= limit, f"{most[0]} bytes were queued, more than the {limit}-byte limit"


def test_write_behind_runs_calls_after_earlier_writes():
    events: list = []
    with WriteBehind(lambda key, tensor: (time.sleep(0.02), events.append(key)), 1 << 20) as behind:
        behind.submit("a", torch.zeros(4))
        behind.call(events.append, "release a")
        behind.submit("b", torch.zeros(4))
    assert events == ["a", "release a", "b"]


def test_write_behind_raises_a_write_error_in_the_producer():
    def write(key, tensor):
        if key == 1:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with WriteBehind(write, 1 << 20) as behind:
            for key in range(50):
                behind.submit(key, torch.zeros(4))
                time.sleep(0.005)


def test_write_behind_drops_queued_writes_when_the_producer_fails():
    written: list = []
    with pytest.raises(ValueError):
        with WriteBehind(_slow_recorder(written, delay=0.05), 1 << 20) as behind:
            for key in range(20):
                behind.submit(key, torch.zeros(4))
            raise ValueError("bad input found while producing")
    assert len(written) < 20


def _advice_log(monkeypatch) -> list:
    advice: list = []
    real = memory._MADVISE
    if real is None:
        pytest.skip("no madvise on this platform")
    monkeypatch.setattr(memory, "_MADVISE", lambda start, length, flag: (advice.append(flag), real(start, length, flag))[1])
    return advice


def test_pages_of_a_read_only_file_mapping_are_unmapped_and_read_back_unchanged(tmp_path, monkeypatch):
    advice = _advice_log(monkeypatch)
    expected = torch.randn(512, 1024)
    save_file({"w": expected}, str(tmp_path / "w.safetensors"))
    with memory.read_only_file_mappings():
        tensor = SafetensorsReader(tmp_path / "w.safetensors").get_tensor("w")
        assert torch.equal(tensor, expected)
        memory.release_pages(tensor)
        assert advice == [memory.MADV_DONTNEED]
        assert torch.equal(tensor, expected), "released pages must come back from the file"
    outside = SafetensorsReader(tmp_path / "w.safetensors").get_tensor("w")
    memory.release_pages(outside)
    assert advice[-1] == memory.MADV_PAGEOUT  # no scope: no registration, the safe advice


def test_memory_that_is_not_a_registered_file_mapping_keeps_its_data(tmp_path, monkeypatch):
    advice = _advice_log(monkeypatch)
    save_file({"w": torch.ones(1024, 1024)}, str(tmp_path / "w.safetensors"))
    with memory.read_only_file_mappings():
        SafetensorsReader(tmp_path / "w.safetensors").get_tensor("w")  # registers its mapping
        anonymous = torch.randn(1024, 1024)
        expected = anonymous.clone()
        memory.release_pages(anonymous)
    assert advice == [memory.MADV_PAGEOUT]
    assert torch.equal(anonymous, expected)


def test_a_failed_config_check_beside_the_stream_fails_the_conversion(tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    tiny_gpt2(hf)

    def refuse(planned, family, config, source_file):
        raise BadInputError("converted weights do not fit the model the config describes: test")

    monkeypatch.setattr(converter, "_validate_hf_plan", refuse)
    assert convert("--load_path", hf, "--save_path", tmp_path / "mg", "--to", "megatron") == 0
    with pytest.raises(BadInputError, match="do not fit"):
        converter.convert(converter.Options(load_path=tmp_path / "mg", save_path=tmp_path / "back", to="hf",
                                            quiet=True))
    assert not (tmp_path / "back").exists()
    assert not list(tmp_path.glob(".back.partial-*"))


def test_exit_now_flushes_output_and_keeps_the_exit_code():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from checkpoint_convert.base.runtime import exit_now\n"
            "print('summary line', end='')\nsys.stderr.write('warning')\nexit_now(3)\n") % str(REPO)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (3, "summary line", "warning")


def test_streaming_settings_are_defaults_a_user_setting_overrides(monkeypatch):
    from checkpoint_convert.base import runtime

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    runtime.tune_torch_for_streaming()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == ("1" if runtime._huge_pages_on_request() else None)


def test_objects_made_while_the_collector_is_paused_are_never_scanned_again():
    """What a heavy import leaves behind is frozen; the collector runs again afterwards."""
    import gc

    from checkpoint_convert.base.runtime import collector_paused

    before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        made = [[index] for index in range(1000)]  # lists are always tracked
    assert gc.isenabled() and gc.get_freeze_count() >= before + len(made)
    gc.unfreeze()  # the rest of the test session is collected as usual


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "mixtral"])
def test_config_json_written_by_transformers_is_read_before_transformers_is_needed(tmp_path, family):
    """For a config.json transformers wrote, the early reading (values as written) is the config
    class's reading, so HF -> Megatron streams while transformers is imported beside it."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_llama import tiny_llama
    from tests.test_mixtral import tiny_mixtral

    makers = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mixtral": tiny_mixtral,
              "mistral": lambda path: tiny_llama(path, family="mistral", sliding_window=8)}
    makers[family](tmp_path)
    with ThreadPoolExecutor(1) as pool:
        early = sources.open_checkpoint(tmp_path, speculate=pool)
        assert early.arch_check is not None and early.arch_check.result() == early.arch
    assert early.arch == sources.open_checkpoint(tmp_path).arch


def test_a_transformers_class_already_imported_is_returned_without_freezing_anything():
    import gc

    from checkpoint_convert.base.runtime import transformers_attr

    first = transformers_attr("LlamaConfig")
    frozen = gc.get_freeze_count()
    assert transformers_attr("LlamaConfig") is first and gc.get_freeze_count() == frozen


class _RecordingBehind:
    def __init__(self):
        self.calls = []

    def call(self, function, *args):
        self.calls.append((function, args))


def test_source_pages_of_copied_outputs_are_released_at_once_and_of_views_after_their_write(monkeypatch):
    released = []
    monkeypatch.setattr(converter, "release_all", lambda tensors: released.append(tensors))
    source, other = torch.arange(64.0), torch.arange(64.0)
    behind = _RecordingBehind()
    converter._hand_back_source_pages([source, other], [torch.cat([source, other]), source.to(torch.bfloat16)], behind)
    assert released == [[source, other]] and behind.calls == []

    released.clear()
    converter._hand_back_source_pages([source, other], [torch.cat([source, other]), other[8:16]], behind)
    assert released == [] and behind.calls == [(converter.release_all, ([source, other],))]


def test_packed_outputs_release_their_source_before_they_are_written(tmp_path, monkeypatch):
    """HF -> Megatron packs c_attn into per-head QKV (a new tensor): its source pages go back on the producing
    thread; a LayerNorm weight is written as a view of its source, whose pages go back on the writing thread."""
    release_all = converter.release_all
    threads = []

    def recording(tensors):
        if tensors:
            threads.append(threading.current_thread().name)
        release_all(tensors)

    model = tiny_gpt2(tmp_path / "hf")
    monkeypatch.setattr(converter, "release_all", recording)
    assert convert("--load_path", tmp_path / "hf", "--save_path", tmp_path / "m", "--to", "megatron") == 0
    assert "MainThread" in threads and "write-behind" in threads
    assert convert("--load_path", tmp_path / "m", "--save_path", tmp_path / "back", "--to", "hf") == 0
    assert_logits_close(logits_of(tmp_path / "back"), logits_of(model))
