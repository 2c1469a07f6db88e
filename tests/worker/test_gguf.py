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
from pagedserve.worker.quant_linear import (MAX_QUANT_ROWS, Int4Linear, Int8Linear, Q4Linear, Q8_0Linear, q4_blocks,
                                            q4_k_blocks)
from tests.helpers import gguf_models
from tests.helpers.tiny_models import PROMPTS, generate_in_process, runner_config

# Prefill: float32 throughout, so logits (|logit| up to ~130 here, from the random Q6_K LM head)
# agree to float rounding. Decode: the int4 op's bfloat16, so to a fraction of the largest logit.
PREFILL_ATOL = 1e-3
DECODE_RTOL = 2e-3  # measured: at most 5e-4
# All-Q8_0 model through the int8 op: the per-block scales requantized per channel (at most half a
# step of the row's scale a weight), decode rows in bfloat16 too. Every step's logits within
# Q8_RTOL of that step's largest |logit| of the dequantized float32 model; measured: at most 0.8%.
Q8_RTOL = 2e-2
# The same model with cpu/q8_0.c chosen (Q8_0Linear): the file's exact blocks, decode rows quantized
# per 32 as Q8_0 (half a step of each block of x a term); prefill in float32 on the exact weight.
# Every decode step's logits within Q8_0_RTOL of its largest |logit|; measured: at most 0.7%
# (the int8 op's 0.8%: the activation's rounding dominates both).
Q8_0_RTOL = 1.5e-2
# 4-bit linears through cpu/q8_0.c (Q4Linear): the blocks exact, decode rows quantized per 32 as
# Q8_0; every decode step's logits within Q4_RTOL of its largest |logit|; measured: at most 4.4e-4
# (the int4 op's bfloat16: 5e-4). With Q4_K_M's mix (KQ_RTOL) at most 1.8% (the int4 op's 1.4%).
Q4_RTOL = 2e-3
# K-quants: Q4_K through the int4 op (bfloat16 scales and zeros), Q5_K/Q6_K/Q8_0 requantized per
# channel into the int8 op; every step's logits within KQ_RTOL of that step's largest |logit| of
# the dequantized float32 model (measured: at most 1.4%; the int4 kind alone 0.8%, int8 alone 1.1%).
KQ_RTOL = 3e-2


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


def test_q4_k_blocks_reproduce_gguf_dequantize_bit_exactly():
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    data = gguf_models.random_kquant_blocks(T.Q4_K, 6, 512, np.random.default_rng(5))
    codes, d, m = q4_k_blocks(data)
    assert codes.shape == (6, 512) and d.shape == m.shape == (6, 16) and int(codes.max()) <= 15
    assert len(set(d.flatten().tolist())) > 16  # eight sub-block scales a super-block, not one
    # ggml's formula, d * q - dmin * mn, with the group's scale and minimum as decoded
    ours = d.repeat_interleave(32, 1) * codes.float() + m.repeat_interleave(32, 1)
    assert torch.equal(ours, torch.from_numpy(dequantize(data, T.Q4_K).reshape(6, 512)))


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


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K"])
def test_int4_linear_matches_the_dequantized_weight(qtype):
    """Prefill sizes run in float32 on the dequantized weight; decode sizes in the op's bfloat16:
    x, the scale and the zero each rounded to 8 significant bits, so each term errs by at most
    about 2^-8 of |x| (|w| + |zero|), bounded here with 2^-7. Q4_K's super-blocks are groups of
    32 with a scale and a minimum each, the same layout, so the same bounds hold."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    weight = np.random.default_rng(2).standard_normal((96, 256)).astype(np.float32) * 0.05
    if qtype == "Q4_1":
        data = quantize(weight, T.Q4_1)
        linear = Int4Linear.from_affine(*q4_blocks(data, "Q4_1"))
    else:
        data = gguf_models.random_kquant_blocks(T.Q4_K, 96, 256, np.random.default_rng(2))
        linear = Int4Linear.from_affine(*q4_k_blocks(data))
    dense = torch.from_numpy(dequantize(data, getattr(T, qtype)).reshape(96, 256))
    atol = 1e-7 * dense.abs().max().item() / 0.2  # float32 rounding of (q - 8) s + z, at |w| <= 0.2 or so
    assert torch.allclose(linear.dequantized(), dense, rtol=0, atol=atol)  # (q - 8) s + z against d q + m
    zero = linear.zero.repeat_interleave(32, 1)
    for rows in (1, 3, MAX_QUANT_ROWS, MAX_QUANT_ROWS + 1, 200):
        x = torch.randn(rows, 256)
        error = (linear(x) - x @ dense.t()).abs()
        if rows > MAX_QUANT_ROWS:
            assert error.max() < 1e-5 * dense.abs().max().item() / 0.2
        else:
            assert (error <= 2 ** -7 * (x.abs() @ (dense.abs() + zero.abs()).t())).all()


def test_served_gguf_matches_transformers_on_the_dequantized_weights(written, monkeypatch):
    # the int4 path whatever this CPU's timing says (quantized_is_faster keeps float32 where
    # slower); the int8 kind (Q8_0, Q6_K and mixed linears, requantized) float32 here, so that
    # greedy output stays transformers' (test_k_quants_... holds them to a bound)
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: isinstance(modules[0], Int4Linear))
    monkeypatch.setattr(quant_linear, "own_kernel_is_faster", lambda candidates: False)  # torch's int4 op
    path, hf_model = written
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    int4 = [name for name, m in runner.model.named_modules() if isinstance(m, Int4Linear)]
    # layer 0's qkv, o, gate_up and down, and layer 1's o; layer 1's others mix Q4_K with Q6_K or Q8_0
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


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K", "Q5_0"])
def test_int8_kinds_requantized_per_channel_are_within_half_a_step(qtype):
    """The int8 op's per-channel scale: each weight of the Int8Linear within half of its row's
    step (max |w_row| / 254) of the GGUF's exact weight (gguf.quants.dequantize's)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from pagedserve.worker.quant_linear import gguf_module
    from pagedserve.worker.gguf_checkpoint import QuantBlocks

    rng = np.random.default_rng(4)
    if qtype in ("Q6_K", "Q5_K"):
        data = gguf_models.random_kquant_blocks(getattr(T, qtype), 48, 256, rng)
    else:
        data = quantize(rng.standard_normal((48, 256)).astype(np.float32) * 0.05, getattr(T, qtype))
    exact = torch.from_numpy(dequantize(data, getattr(T, qtype)).reshape(48, 256).astype(np.float32))
    module = gguf_module("int8", [QuantBlocks(getattr(T, qtype), data, 256)], exact, None)
    assert isinstance(module, Int8Linear)
    served = module.codes.float() * module.scale[:, None]
    step = exact.abs().amax(-1, keepdim=True) / 127
    # plus float32 rounding: the scale's (2^-24 relative) times codes up to 127, and the product's
    assert ((served - exact).abs() <= step / 2 + step * 127 * 2 ** -22).all()
    assert (served != exact).any()  # requantized for real


def served_and_expected(runner, hf_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt of PROMPTS, 4 greedy tokens served by `runner`: (its logits [4, vocab], the
    dequantized float32 model's logits [4, vocab] on the same tokens)."""
    outputs, logits = generate_in_process(runner, PROMPTS, 4)
    pairs = []
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt + outputs[i][:-1]])).logits[0, len(prompt) - 1:]
        pairs.append((torch.stack([torch.as_tensor(step[i]) for step in logits]), expected))
    return pairs


@pytest.fixture(scope="module")
def written_q8(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-q8") / "tiny-q8_0.gguf"
    return path, gguf_models.write(path, types=gguf_models.all_of("Q8_0"))


Q8_0_MODULES = {"int8": Int8Linear, "q8_0": Q8_0Linear}


@pytest.mark.parametrize("kernel", ["int8", "q8_0"])
def test_q8_0_gguf_runs_quantized_within_bound_of_the_dequantized_model(written_q8, monkeypatch, kernel):
    # quantized whatever this CPU's timing says (quantized_wins keeps float32 where slower), through
    # the int8 op on requantized weights or cpu/q8_0.c on the blocks (choose_own_kernel times them)
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: True)
    monkeypatch.setattr(quant_linear, "own_kernel_is_faster", lambda candidates: kernel == "q8_0")
    path, hf_model = written_q8
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    quantized = [name for name, m in runner.model.named_modules() if isinstance(m, Q8_0_MODULES[kernel])]
    assert len(quantized) == 2 * 4 + 1  # qkv, o, gate_up, down of both layers, and the LM head
    choice = quant_linear.Q8_0_NAMES[kernel]
    assert any(line.startswith("Q8_0 linears at 1 row (9 of them") and line.endswith(f"{choice} (timed)")
               for line in runner.worker_info().kernel_choices)
    for i, (served, expected) in enumerate(served_and_expected(runner, hf_model)):
        error = (served - expected).abs()
        assert (error <= Q8_RTOL * expected.abs().amax(-1, keepdim=True)).all(), i
        assert error.max() > 0  # quantized for real
        if kernel == "q8_0":  # the prefill step runs the file's exact weights in float32
            torch.testing.assert_close(served[0], expected[0], rtol=0, atol=PREFILL_ATOL)
            assert (error[1:] <= Q8_0_RTOL * expected[1:].abs().amax(-1, keepdim=True)).all(), i


def test_q8_0_linear_runs_the_files_exact_blocks():
    """q8_0_blocks are gguf.quants.dequantize's weight bit for bit; a Q8_0Linear runs them through
    cpu/q8_0.c up to MAX_QUANT_ROWS rows and through F.linear on that exact weight above."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from pagedserve.worker.cpu import q8_0
    from pagedserve.worker.quant_linear import q8_0_blocks

    rng = np.random.default_rng(5)
    data = quantize(rng.standard_normal((40, 96)).astype(np.float32) * 0.05, T.Q8_0)
    exact = torch.from_numpy(dequantize(data, T.Q8_0).reshape(40, 96).astype(np.float32))
    codes, scales = q8_0_blocks(data)
    module = Q8_0Linear(codes, scales, torch.full((40,), 0.5), q8_0.kernel())
    assert torch.equal(module.dequantized(), exact)
    for rows in (1, MAX_QUANT_ROWS):
        x = torch.randn(rows, 96)
        assert torch.equal(module(x), q8_0.kernel().linear(x, codes, scales) + 0.5)
    x = torch.randn(MAX_QUANT_ROWS + 1, 96)
    torch.testing.assert_close(module(x), x @ exact.t() + 0.5, rtol=0, atol=1e-5)


def test_own_kernel_is_faster_times_the_kernel_against_torchs_op():
    import time

    from pagedserve.worker.quant_linear import Candidate, own_kernel_is_faster

    fast, slow = (lambda x: x), (lambda x: time.sleep(2e-3))
    weight = torch.zeros(8, 32)
    assert own_kernel_is_faster([Candidate("a", lambda: slow, weight, lambda: fast)], repeats=3)
    assert not own_kernel_is_faster([Candidate("a", lambda: fast, weight, lambda: slow)], repeats=3)


def test_q8_0_gguf_stays_float_where_the_int8_op_is_slower_and_says_so(written_q8, monkeypatch):
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: False)
    path, _ = written_q8
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    assert not any(isinstance(m, Int8Linear) for m in runner.model.modules())
    assert any(line.startswith("GGUF Q8_0 linears: dequantized to float32") for line in runner.worker_info().kernel_choices)


@pytest.mark.parametrize("kernel", ["int8", "q8_0"])
def test_a_tied_lm_head_runs_on_the_embeddings_q8_0_blocks(tmp_path, monkeypatch, kernel):
    # SmolLM2's GGUF files have no output.weight: the head is token_embd (Q8_0 even in a Q4_1 file),
    # and served float32 it read 4x the bytes a token that llama.cpp reads for it
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: True)
    monkeypatch.setattr(quant_linear, "own_kernel_is_faster", lambda candidates: kernel == "q8_0")
    path = tmp_path / "tiny-tied-q8_0.gguf"
    hf_model = gguf_models.write(path, types=gguf_models.all_of("Q8_0"), tied=True)
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    head = runner.model.get_submodule("lm_head")
    assert isinstance(head, Q8_0_MODULES[kernel]) and head.codes.shape == (gguf_models.VOCAB, gguf_models.HIDDEN)
    for i, (served, expected) in enumerate(served_and_expected(runner, hf_model)):
        assert ((served - expected).abs() <= Q8_RTOL * expected.abs().amax(-1, keepdim=True)).all(), i


# Q4_K_M's mix, as llama-quantize writes it: Q4_K linears, some v_proj and down_proj in Q6_K (and,
# where a row is no multiple of 256, Q5_0/Q8_0), a Q8_0 embedding and a Q6_K output
KQUANT_TYPES = {**gguf_models.all_of("Q4_K"), "model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q6_K",
                "1.v_proj": "Q6_K", "1.down_proj": "Q5_K", "1.up_proj": "Q5_0"}


@pytest.mark.parametrize("kernel", ["torch", "ours"])
def test_k_quants_run_quantized_within_bound_of_the_dequantized_model(tmp_path, monkeypatch, kernel):
    # 4-bit linears through torch's int4 op or cpu/q8_0.c's 4-bit dot (Q4Linear), as choose_own_kernel
    # would pick; the rest through the int8 op
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: True)
    monkeypatch.setattr(quant_linear, "own_kernel_is_faster", lambda candidates: kernel == "ours")
    path = tmp_path / "tiny-q4_k_m.gguf"
    hf_model = gguf_models.write(path, types=KQUANT_TYPES)
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    four_bit = Q4Linear if kernel == "ours" else Int4Linear
    kinds = {name: type(m) for name, m in runner.model.named_modules() if isinstance(m, (four_bit, Int8Linear))}
    layer = lambda i, names: {f"model.layers.{i}.{n}" for n in names}
    # Q4_K on its own codes; a fused linear with a Q6_K/Q5_0 section, Q5_K and Q6_K requantized
    assert {n for n, k in kinds.items() if k is four_bit} == (
        layer(0, ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"])
        | layer(1, ["self_attn.o_proj"]))
    assert {n for n, k in kinds.items() if k is Int8Linear} == (
        layer(1, ["self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]) | {"lm_head"})
    for i, (served, expected) in enumerate(served_and_expected(runner, hf_model)):
        error = (served - expected).abs()
        assert (error <= KQ_RTOL * expected.abs().amax(-1, keepdim=True)).all(), (i, (error / expected.abs().amax(-1, keepdim=True)).max())
        assert error.max() > 0  # quantized for real


def test_4bit_gguf_runs_through_cpu_q8_0_c_within_bound_of_the_dequantized_model(written, monkeypatch):
    # Q4_0/Q4_1/Q4_K linears as Q4Linear (the int8 kind float32, as in the greedy test above)
    monkeypatch.setattr(quant_linear, "quantized_is_faster", lambda modules, weights: isinstance(modules[0], Q4Linear))
    monkeypatch.setattr(quant_linear, "own_kernel_is_faster", lambda candidates: True)
    path, hf_model = written
    runner = ModelRunner(runner_config(path, tokenizer=str(path.parent / "tokenizer")))
    ours = [name for name, m in runner.model.named_modules() if isinstance(m, Q4Linear)]
    assert sorted(ours) == sorted([f"model.layers.0.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                   "mlp.gate_up_proj", "mlp.down_proj")] + ["model.layers.1.self_attn.o_proj"])
    assert any(line.startswith("4-bit linears at 1 row (5 of them") and line.endswith(
        f"{quant_linear.Q4_NAMES['q4']} (timed)") for line in runner.worker_info().kernel_choices)
    for i, (served, expected) in enumerate(served_and_expected(runner, hf_model)):
        # the prefill step in float32 on the exact weights; decode steps through the kernel
        torch.testing.assert_close(served[0], expected[0], rtol=0, atol=PREFILL_ATOL)
        scale = expected[1:].abs().amax(-1, keepdim=True)
        assert ((served[1:] - expected[1:]).abs() <= Q4_RTOL * scale).all(), i
        assert (served[1:] != expected[1:]).any()
