"""A GGUF file served as it is (--model FILE.gguf --tokenizer DIR): its tensors dequantized
bit-exactly as the `gguf` package does, under transformers' names and row order; its 4-bit
linears run on their own blocks through torch's int4 op; and the whole model computes what
transformers computes with the dequantized float32 weights.
"""
import numpy as np
import pytest
import torch

from pagedserve.worker.checkpoint import LoadError
from pagedserve.worker.gguf_checkpoint import gguf_config, read_tensors
from pagedserve.worker import quant_linear
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.quant_linear import MAX_QUANT_ROWS, Int4Linear, q4_blocks
from tests.helpers import gguf_models
from tests.helpers.tiny_models import PROMPTS, generate_in_process, runner_config

# Prefill: float32 throughout, so logits (|logit| up to ~130 here, from the random Q6_K LM head)
# agree to float rounding. Decode: the int4 op's bfloat16, so to a fraction of the largest logit.
PREFILL_ATOL = 1e-3
DECODE_RTOL = 2e-3  # measured: at most 5e-4


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, gguf_models.write(path)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_reproduce_gguf_dequantize_bit_exactly(qtype):
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    weight = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)
    data = quantize(weight, getattr(T, qtype))
    codes, d, m = q4_blocks(data, qtype)
    d_full, m_full = d.repeat_interleave(32, 1), m.repeat_interleave(32, 1)
    # ggml's own formulas: Q4_0 d * (q - 8), Q4_1 d * q + m
    ours = d_full * (codes - 8).float() if qtype == "Q4_0" else d_full * codes.float() + m_full
    assert torch.equal(ours, torch.from_numpy(dequantize(data, getattr(T, qtype)).reshape(6, 128)))


def test_every_tensor_reads_as_gguf_dequantizes_it_in_transformers_order(written):
    path, hf_model = written
    config = gguf_config(path)
    assert (config["num_hidden_layers"], config["hidden_size"], config["rms_norm_eps"]) == (2, 256, 1e-5)
    tensors, blocks = read_tensors(path, config)
    state = hf_model.state_dict()
    assert set(tensors) == set(state)
    for name, expected in state.items():  # Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and F32, q/k rows unpermuted
        assert torch.equal(tensors[name].read((slice(None),)), expected), name
    assert {b.type.name for b in blocks.values()} == {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}


def test_int4_linear_matches_the_dequantized_weight():
    """Prefill sizes run in float32 on the dequantized weight; decode sizes in the op's bfloat16:
    x, the scale and the zero each rounded to 8 significant bits, so each term errs by at most
    about 2^-8 of |x| (|w| + |zero|), bounded here with 2^-7."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    weight = np.random.default_rng(2).standard_normal((96, 256)).astype(np.float32) * 0.05
    data = quantize(weight, T.Q4_1)
    linear = Int4Linear.from_affine(*q4_blocks(data, "Q4_1"))
    dense = torch.from_numpy(dequantize(data, T.Q4_1).reshape(96, 256))
    assert torch.allclose(linear.dequantized(), dense, rtol=0, atol=1e-7)  # (q - 8) s + z against d q + m
    zero = linear.zero.repeat_interleave(32, 1)
    for rows in (1, 3, MAX_QUANT_ROWS, MAX_QUANT_ROWS + 1, 200):
        x = torch.randn(rows, 256)
        error = (linear(x) - x @ dense.t()).abs()
        if rows > MAX_QUANT_ROWS:
            assert error.max() < 1e-5
        else:
            assert (error <= 2 ** -7 * (x.abs() @ (dense.abs() + zero.abs()).t())).all()


def test_served_gguf_matches_transformers_on_the_dequantized_weights(written, monkeypatch):
    # the int4 path whatever this CPU's timing says (quantized_is_faster keeps float32 where slower)
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda module, weight: True)
    path, hf_model = written
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    int4 = [name for name, m in runner.model.named_modules() if isinstance(m, Int4Linear)]
    # layer 0's qkv, o, gate_up and down, and layer 1's o; layer 1's others hold K-quants or Q8_0
    assert sorted(int4) == sorted([f"model.layers.0.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                   "mlp.gate_up_proj", "mlp.down_proj")] + ["model.layers.1.self_attn.o_proj"])
    assert runner.worker_info().model_path == str(path.parent / "tokenizer")
    max_tokens = 6
    outputs, logits = generate_in_process(runner, PROMPTS, max_tokens)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = hf_model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, len(prompt):].tolist()
        assert outputs[i] == expected, i
        with torch.no_grad():
            expected_logits = hf_model(torch.tensor([prompt + expected[:-1]])).logits[0, len(prompt) - 1:]
        served = torch.stack([torch.as_tensor(step[i]) for step in logits])
        # the prefill step (62 rows) runs in float32, the decode steps (4 rows) in the int4 op's bfloat16
        torch.testing.assert_close(served[0], expected_logits[0], rtol=0, atol=PREFILL_ATOL)
        scale = expected_logits[1:].abs().amax(-1, keepdim=True)
        assert ((served[1:] - expected_logits[1:]).abs() <= DECODE_RTOL * scale).all()


def test_gguf_refuses_tensor_parallelism_and_other_dtypes(written):
    path, _ = written
    with pytest.raises(LoadError, match="world-size 1"):
        from pagedserve.worker.loader import inspect_model_dir
        inspect_model_dir(runner_config(path, world_size=2))
    with pytest.raises(LoadError, match="float32"):
        ModelRunner(runner_config(path, dtype="bfloat16"))
