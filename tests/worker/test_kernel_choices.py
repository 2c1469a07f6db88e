"""The CPU path's start-up timing choices, cached per CPU signature in a JSON file
(worker/cpu/kernel_choices.py) and reported in WorkerInfo.kernel_choices: a second start on the
same CPU reads them back and times nothing; another CPU signature, a damaged file or an unknown
answer is timed again. Each test here has its own cache file (the suite otherwise runs with the
cache off, tests/conftest.py)."""
import json

import pytest
import torch

from pagedserve.worker.cpu import kernel_choices, linear
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers.model_driver import BLOCK_SIZE, make_tiny_llama


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "kernel-choices.json"
    monkeypatch.setenv(kernel_choices.ENV, str(path))
    return path


def counting(answer):
    calls = []
    return calls, lambda: (calls.append(1), answer)[1]


def test_a_choice_is_timed_once_then_read_back(cache_file):
    calls, choose = counting("b")
    assert kernel_choices.cached("k 4x4", ("a", "b"), choose) == ("b", False)
    assert kernel_choices.cached("k 4x4", ("a", "b"), choose) == ("b", True)
    assert len(calls) == 1
    data = json.loads(cache_file.read_text())
    (entry,) = data.values()
    assert entry["choices"] == {"k 4x4": "b"}
    assert entry["signature"] == kernel_choices.signature()
    assert entry["signature"]["torch"] == torch.__version__ and entry["signature"]["cores"] >= 1


def test_another_cpu_signature_or_an_unknown_answer_is_timed_again(cache_file, monkeypatch):
    calls, choose = counting("a")
    kernel_choices.cached("k", ("a", "b"), choose)
    monkeypatch.setattr(kernel_choices, "signature", lambda: {"cpu": "another", "threads": 64})
    assert kernel_choices.cached("k", ("a", "b"), choose) == ("a", False)
    assert len(calls) == 2 and len(json.loads(cache_file.read_text())) == 2  # both CPUs kept
    monkeypatch.undo()
    monkeypatch.setenv(kernel_choices.ENV, str(cache_file))
    assert kernel_choices.cached("k", ("b", "c"), choose)[1] is False  # "a" is no longer an answer


def test_a_damaged_file_is_timed_again_and_rewritten(cache_file):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    calls, choose = counting("a")
    assert kernel_choices.cached("k", ("a",), choose) == ("a", False)
    assert kernel_choices.cached("k", ("a",), choose) == ("a", True)


def test_off_times_every_time(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_choices.ENV, "off")
    calls, choose = counting("a")
    kernel_choices.cached("k", ("a",), choose)
    kernel_choices.cached("k", ("a",), choose)
    assert len(calls) == 2 and kernel_choices.cache_path() is None


def test_a_restart_reads_the_choices_back_and_reports_them(cache_file, tmp_path, monkeypatch):
    """The first worker times each float32 linear shape and caches it; a second one on the same
    CPU times nothing (the timing function fails if called) and reports the same choices."""
    make_tiny_llama(tmp_path / "m")
    from pagedserve.worker.config import WorkerConfig

    config = WorkerConfig(model=str(tmp_path / "m"), block_size=BLOCK_SIZE, num_gpu_blocks_override=16, num_threads=1)
    first = ModelRunner(config).worker_info().kernel_choices
    shapes = ["128x64", "64x64", "256x64", "64x128"]  # qkv (and the LM head: 128 tokens), o, gate_up, down
    assert [line.split(" at 1 row")[0] for line in first] == [f"float32 linear {s}" for s in shapes]
    assert all(line.endswith(("cpu/linear.c (timed)", "F.linear (timed)")) for line in first)

    def no_timing(module):
        raise AssertionError("timed again despite the cache")
    monkeypatch.setattr(linear, "choose_small_rows_path", no_timing)
    second = ModelRunner(config).worker_info().kernel_choices
    assert second == [line.replace("(timed)", "(cached)") for line in first]
