"""--quantization int8 / int4: a float checkpoint's linears quantized as it loads (weight-only,
round to nearest), served through torch's int ops, with logits within a stated bound of
transformers' float32 model."""
import pytest
import torch

from pagedserve.worker import quant_linear
from pagedserve.worker.checkpoint import LoadError
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.quant_linear import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from tests.helpers import tiny_models
from tests.helpers.tiny_models import PROMPTS, generate_in_process, runner_config

# Logits of the tiny random Llama (|logit| up to ~0.7) against transformers' float32 forward, all
# steps (prefill in float32 on the dequantized weight, decode through the ops in bfloat16).
# Measured: int8 up to 7e-3 (1% of the largest logit), int4 up to 8e-2 (12%: 16 levels a group
# of random Gaussian weights is coarse); the bounds leave 2-3x.
LOGIT_ATOL = {"int8": 2e-2, "int4": 0.2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-q")
    return path, tiny_models.build("llama", path)


def test_round_to_nearest_is_within_half_a_step():
    weight = torch.randn(48, 96)
    codes, scale = quantize_int8(weight)
    assert ((codes.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()
    codes, d, m = quantize_int4(weight)
    dequantized = codes.view(48, 3, 32).float() * d[..., None] + m[..., None]
    assert ((dequantized - weight.view(48, 3, 32)).abs() <= d[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_logits_within_bound_of_float32(tiny, method, monkeypatch):
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: True)
    path, hf_model = tiny
    runner = ModelRunner(runner_config(path, quantization=method))
    kinds = {name: type(m) for name, m in runner.model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    # qkv, o, gate_up, down per layer, and the LM head: int8 under int4 too (as a GGUF's Q8_0
    # embedding serves a 4-bit file's tied head)
    assert len(kinds) == 2 * 4 + 1 and kinds["lm_head"] is Int8Linear
    assert {kinds[name] for name in kinds if name != "lm_head"} == {Int8Linear if method == "int8" else Int4Linear}
    decisions = [line.split(" at 1 row (")[0] for line in runner.worker_info().kernel_choices if " at 1 row (" in line]
    assert decisions == (["int8 linears against float32"] if method == "int8"
                         else ["int4 linears against float32", "int8 linears against float32"])
    max_tokens = 4
    outputs, logits = generate_in_process(runner, PROMPTS, max_tokens)
    for i, prompt in enumerate(PROMPTS):
        tokens = prompt + outputs[i][:-1]
        with torch.no_grad():
            expected = hf_model(torch.tensor([tokens])).logits[0, len(prompt) - 1:]
        served = torch.stack([torch.as_tensor(step[i]) for step in logits])
        error = (served - expected).abs().max().item()
        assert error < LOGIT_ATOL[method], (i, error)
        assert error > 0  # quantized for real


def test_quantization_kept_float_where_the_cpu_runs_it_slower(tiny, monkeypatch):
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: False)
    runner = ModelRunner(runner_config(tiny[0], quantization="int4"))
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in runner.model.modules())
    # ... and says so to whoever asks the worker, not only in its log
    assert any(line.startswith("--quantization int4: not applied, float32 weights served")
               for line in runner.worker_info().kernel_choices)
    assert any(line.startswith("--quantization int4: not applied to the LM head and other int8 linears")
               for line in runner.worker_info().kernel_choices)


def test_quantized_or_float_is_timed_over_every_linear_of_the_model(tiny, monkeypatch):
    # One small weight sits in the CPU's cache after its first call, which times float32 at its
    # best (a Q4_1 SmolLM2 was served dequantized, 1.5x slower, for that): the decision times
    # the whole model's linears, streamed as a decode step streams them.
    seen = []

    def record(modules, weights):
        seen.append([(type(m), tuple(w.shape)) for m, w in zip(modules, weights)])
        return True
    monkeypatch.setattr(quant_linear, "quantized_is_faster", record)
    runner = ModelRunner(runner_config(tiny[0], quantization="int8"))
    linears = [m for m in runner.model.modules() if isinstance(m, Int8Linear)]
    assert len(seen) == 1 and len(seen[0]) == len(linears) == 2 * 4 + 1
    assert {kind for kind, _ in seen[0]} == {Int8Linear}
    assert sorted(shape for _, shape in seen[0]) == sorted((m.out_features, m.in_features) for m in linears)


def test_quantized_is_faster_runs_every_module():
    calls = []
    weights = [torch.randn(32, 64), torch.randn(48, 32)]

    class Counted(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            calls.append(tuple(self.weight.shape))
            return torch.nn.functional.linear(x, self.weight)
    quant_linear.quantized_is_faster(tuple(Counted(w) for w in weights), tuple(weights), repeats=3)
    assert calls == [(32, 64), (48, 32)] * 3


def test_quantization_needs_float32(tiny):
    with pytest.raises(LoadError, match="float32"):
        ModelRunner(runner_config(tiny[0], quantization="int8", dtype="bfloat16"))


@pytest.mark.parametrize("faster", [False, True])
def test_only_the_timed_linears_are_built_before_the_decision(tiny, faster, monkeypatch):
    # A kind that loses to float32 costs the load (time and peak memory) only the quantized
    # modules its timing ran on; one that wins reuses them and builds the rest.
    monkeypatch.setattr(quant_linear, "TIMED_BYTES", 1)  # the first linear alone reaches it
    builds, timed = [], []
    quantize = quant_linear.quantize_int8
    monkeypatch.setattr(quant_linear, "quantize_int8", lambda weight: builds.append(weight.shape) or quantize(weight))
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: timed.append(len(modules)) or faster)
    runner = ModelRunner(runner_config(tiny[0], quantization="int8"))
    assert timed == [1]
    assert len(builds) == (2 * 4 + 1 if faster else 1)
    assert sum(isinstance(m, Int8Linear) for m in runner.model.modules()) == (2 * 4 + 1 if faster else 0)
    # the decision still speaks for (and is cached under) every linear of the kind
    assert any(line.startswith("int8 linears against float32 at 1 row (9 of them") for line in runner.worker_info().kernel_choices)


def test_a_cached_decision_builds_nothing_before_it(tiny, tmp_path, monkeypatch):
    from pagedserve.worker.cpu import kernel_choices

    monkeypatch.setenv(kernel_choices.ENV, str(tmp_path / "choices.json"))
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: False)
    ModelRunner(runner_config(tiny[0], quantization="int8"))
    builds = []
    quantize = quant_linear.quantize_int8
    monkeypatch.setattr(quant_linear, "quantize_int8", lambda weight: builds.append(weight.shape) or quantize(weight))
    runner = ModelRunner(runner_config(tiny[0], quantization="int8"))
    assert builds == []
    assert "int8 linears against float32 at 1 row (9 of them, 0 MiB in float32): float32 (cached)" in runner.worker_info().kernel_choices
