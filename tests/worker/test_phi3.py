"""Phi-3's LongRoPE against transformers, on a tiny random Phi3ForCausalLM whose pretraining
context (`original_max_position_embeddings`) is 64 tokens and extended one 256: served within 64
tokens the short factors rotate, served past it the long ones, and either way the logits (fp32,
within 1e-4) and greedy tokens are transformers'; and RoPE over part of each head (Phi-4-mini).
(The plain-RoPE Phi-3, its fused checkpoint tensors and tensor parallelism are in
tests/stack/test_architectures.py and test_tensor_parallel.py.)"""
import pytest
import torch

from pagedserve.v1 import worker_pb2
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import tiny_models
from tests.helpers.model_driver import BLOCK_SIZE, PROMPTS, Driver, hf_greedy, hf_last_logits

ORIGINAL = 64
HEAD_DIM = tiny_models.HIDDEN // 4


@pytest.fixture(scope="module", params=["longrope", "su"])
def phi3(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3-longrope")
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.2 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + 3.0 * i for i in range(HEAD_DIM // 2)]}
    hf_model = tiny_models.build("phi3", path, seed=2, rope_parameters=rope, original_max_position_embeddings=ORIGINAL)
    if request.param == "su":  # what early Phi-3 configs call it
        config = path / "config.json"
        config.write_text(config.read_text().replace('"longrope"', '"su"'))
    return path, hf_model


def run(path, max_model_len, prompts, decodes):
    runner = ModelRunner(WorkerConfig(model=str(path), block_size=BLOCK_SIZE, num_gpu_blocks_override=256,
                                      max_model_len=max_model_len))
    d = Driver(runner)
    plan = worker_pb2.StepPlan(step_id=1, new_sequences=[d.new(i, p) for i, p in enumerate(prompts)],
                               scheduled=[d.sched(i, len(p)) for i, p in enumerate(prompts)])
    result, logits = runner.run_step(plan)
    for seq_id, token in zip(result.seq_ids, result.token_ids):
        d.outputs[seq_id].append(token)
    d.step_id = 1
    for _ in range(decodes):
        d.step(sched=[d.sched(i, 1) for i in range(len(prompts))])
    return d.outputs, logits


def test_short_factors_within_the_original_context_match_transformers(phi3):
    path, hf_model = phi3
    outputs, logits = run(path, ORIGINAL, PROMPTS, 6)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[i], hf_last_logits(hf_model, prompt), atol=1e-4, rtol=0)
        assert outputs[i] == hf_greedy(hf_model, prompt, 7), f"prompt {i}"


def test_long_factors_past_the_original_context_match_transformers(phi3):
    path, hf_model = phi3
    prompt = [(13 * i + 5) % 128 for i in range(100)]
    outputs, logits = run(path, None, [prompt], 6)
    torch.testing.assert_close(logits[0], hf_last_logits(hf_model, prompt), atol=1e-4, rtol=0)
    assert outputs[0] == hf_greedy(hf_model, prompt, 7)
    # The served context picks the set for every position: a short prompt served with 256 tokens
    # of context is rotated by the long factors, where transformers (one forward call of 40
    # tokens) takes the short ones; the two sets give visibly different logits.
    _, long_logits = run(path, None, [prompt[:40]], 0)
    assert (long_logits[0] - hf_last_logits(hf_model, prompt[:40])).abs().max() > 1e-3


@pytest.mark.parametrize("rope_type", ["default", "longrope"])
def test_partial_rotary_matches_transformers(tmp_path, rope_type):
    """Phi-4-mini's layout: RoPE over 3/4 of each head's dims (12 of 16 here), the rest unrotated."""
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    if rope_type == "longrope":
        rope.update(short_factor=[1.0 + 0.3 * i for i in range(6)], long_factor=[2.0 + i for i in range(6)])
    hf_model = tiny_models.build("phi3", tmp_path, seed=5, rope_parameters=rope,
                                 original_max_position_embeddings=ORIGINAL, tie_word_embeddings=True)
    outputs, logits = run(tmp_path, ORIGINAL, PROMPTS[:2], 5)
    for i, prompt in enumerate(PROMPTS[:2]):
        torch.testing.assert_close(logits[i], hf_last_logits(hf_model, prompt), atol=1e-4, rtol=0)
        assert outputs[i] == hf_greedy(hf_model, prompt, 6), f"prompt {i}"
