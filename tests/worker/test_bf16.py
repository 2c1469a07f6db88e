"""bfloat16 on the CPU: `--dtype auto` picks it for a bfloat16 checkpoint where the CPU has
AVX-512 BF16 or AMX (worker/loader.py:resolve_dtype, worker/cpu/features.py), and the served model
(oneDNN's bfloat16 linears on the packed weights, worker/cpu/linear.py) agrees with transformers
run in bfloat16 on the same weights: logits within LOGIT_TOLERANCE at the prefill and at each of 16
greedy steps, and transformers' greedy tokens but for near ties."""
import pytest
import torch

from pagedserve.v1 import worker_pb2
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.cpu import features
from pagedserve.worker.cpu.linear import PackedLinear
from pagedserve.worker.loader import resolve_dtype
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers.model_driver import BLOCK_SIZE, PROMPTS, Driver, hf_last_logits, make_tiny_llama

# The logits here are below 1 in magnitude, where a bfloat16 ulp is at most 2^-8: a few ulps of
# rounding that another summation order (oneDNN's, AMX's) may move. Measured: 0 on this model.
LOGIT_TOLERANCE = 2e-2
needs_bf16 = pytest.mark.skipif(not features.has_native_bf16(), reason="the CPU has neither AVX-512 BF16 nor AMX")


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """A tiny random Llama saved in bfloat16 (config.json's dtype says so), and transformers'
    model loaded from it in bfloat16."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-bf16")
    make_tiny_llama(path).to(torch.bfloat16).save_pretrained(path)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def config_of(path, **overrides):
    return WorkerConfig(model=str(path), block_size=BLOCK_SIZE, num_gpu_blocks_override=128, num_threads=1,
                        **overrides)


@pytest.mark.parametrize("saved,native,quantized,want", [
    ("bfloat16", True, False, torch.bfloat16),
    ("float16", True, False, torch.bfloat16),
    ("bfloat16", False, False, torch.float32),  # no bfloat16 units: float32 is faster
    ("float32", True, False, torch.float32),    # a float32 checkpoint is served as saved
    ("bfloat16", True, True, torch.float32),    # --quantization's ops take a float32 model
    (None, True, False, torch.float32),
])
def test_auto_dtype_on_the_cpu(monkeypatch, saved, native, quantized, want):
    from types import SimpleNamespace

    monkeypatch.setattr(features, "has_native_bf16", lambda: native)
    assert resolve_dtype("auto", SimpleNamespace(dtype=saved), torch.device("cpu"), quantized) == want
    # An explicit --dtype is always obeyed; CUDA keeps the checkpoint's dtype.
    assert resolve_dtype("float32", SimpleNamespace(dtype="bfloat16"), torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="float16"), torch.device("cuda")) == torch.float16


def test_cpu_flags_are_read_from_proc_cpuinfo():
    with open("/proc/cpuinfo") as f:
        line = next(line for line in f if line.startswith("flags"))
    assert features.cpu_flags() == frozenset(line.split(":")[1].split())
    assert features.has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & features.cpu_flags())


@needs_bf16
def test_auto_serves_a_bf16_checkpoint_in_bf16_as_transformers_does(tiny_bf16):
    path, hf = tiny_bf16
    runner = ModelRunner(config_of(path))
    assert runner.loaded.dtype == torch.bfloat16 and runner.worker_info().dtype == "bfloat16"
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    d = Driver(runner)
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=[d.new(i, p) for i, p in enumerate(PROMPTS)],
                               scheduled=[d.sched(i, len(p)) for i, p in enumerate(PROMPTS)])
    _, logits = runner.run_step(plan)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[i].float(), hf_last_logits(hf, prompt).float(),
                                   rtol=0, atol=LOGIT_TOLERANCE)
    runner.run_step(worker_pb2.StepPlan(step_id=2, freed_seq_ids=range(len(PROMPTS))))
    # 16 greedy steps, the decodes reading the bfloat16 cache (worker/cpu/attention.c). Every step's
    # logits within LOGIT_TOLERANCE of transformers' on the same context, and every token
    # transformers' greedy choice there, or within LOGIT_TOLERANCE of it: a near tie, which two
    # correct roundings may break either way. Measured: prompt 2's 9th token, 1 ulp (2^-9) below
    # transformers' top logit, is float32 transformers' choice.
    d = Driver(runner)
    plan = worker_pb2.StepPlan(new_sequences=[d.new(i, p) for i, p in enumerate(PROMPTS)],
                               scheduled=[d.sched(i, len(p)) for i, p in enumerate(PROMPTS)])
    steps = []
    for step_id in range(3, 3 + 16):
        plan.step_id = step_id
        result, logits = runner.run_step(plan)
        steps.append(dict(zip(result.seq_ids, logits)))
        for seq_id, token in zip(result.seq_ids, result.token_ids):
            d.outputs[seq_id].append(token)
        plan = worker_pb2.StepPlan(scheduled=[d.sched(i, 1) for i in range(len(PROMPTS))])
    for i, prompt in enumerate(PROMPTS):
        ours, exact = d.outputs[i], 0
        for j, token in enumerate(ours):
            expected = hf_last_logits(hf, list(prompt) + ours[:j]).float()
            torch.testing.assert_close(steps[j][i].float(), expected, rtol=0, atol=LOGIT_TOLERANCE)
            assert expected[token] >= expected.max() - LOGIT_TOLERANCE, f"prompt {i}, token {j}"
            exact += token == int(expected.argmax())
        assert exact >= len(ours) - 1, f"prompt {i}: {len(ours) - exact} near ties"


@needs_bf16
def test_bf16_linears_run_through_packed_onednn_where_faster(tiny_bf16, monkeypatch):
    from pagedserve.worker.cpu import linear

    monkeypatch.setattr(linear, "choose_bf16_path", lambda module, packed: "onednn")
    runner = ModelRunner(config_of(tiny_bf16[0]))
    assert not any(isinstance(m, torch.nn.Linear) for m in runner.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in runner.model.modules()) == 2 * 4 + 1  # qkv, o, gate_up, down; head


def test_float32_checkpoint_stays_float32_under_auto(tmp_path):
    make_tiny_llama(tmp_path)
    assert ModelRunner(config_of(tmp_path)).loaded.dtype == torch.float32
