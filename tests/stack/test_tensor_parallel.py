"""Tensor parallelism against one rank: the sharded model's logits (fp32, within 1e-4) and greedy
tokens on tiny random models, each rank holding about 1/N of the weights and a KV cache of only
its own heads; OPT and Qwen2 at TP=2 and SmolLM2 at TP=3 through the whole stack; a rank killed
mid-request ends that request with an error and the scheduler reports unhealthy.
"""
import os
import re
import signal

import grpc
import pytest
import torch
from openai import OpenAI

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference, tiny_models
from tests.helpers.stack import generate_all, run_stack
from tests.helpers.tiny_models import PROMPTS, generate_in_process, rank_generate, runner_config, weight_bytes
from pagedserve.worker import distributed
from pagedserve.worker.model_runner import ModelRunner

MAX_TOKENS = 5


@pytest.mark.parametrize("architecture, kv_heads, world_size", [
    ("llama", 2, 2), ("llama", 2, 4), ("llama", 4, 2), ("llama", 4, 4),  # 8 query heads
    ("opt", None, 2), ("qwen2", None, 2), ("qwen3", None, 2), ("gpt2", None, 4),
    ("qwen3_moe", None, 2), ("qwen2_moe", None, 2), ("mixtral", None, 2),  # a slice of every expert
    ("phi3", 1, 2),  # fused qkv_proj in the checkpoint, its one KV head on both ranks
    ("deepseek_v3", None, 2),  # latent attention's heads split, its latents whole on each rank
    ("mistral_swa", None, 2), ("gemma2", None, 2), ("gemma3", None, 2),  # prompts longer than their windows
])
def test_logits_at_tensor_parallel_size_match_one_rank(tmp_path, architecture, kv_heads, world_size):
    tiny_models.build(architecture, tmp_path, **({"num_key_value_heads": kv_heads} if kv_heads else {}))
    one = ModelRunner(runner_config(tmp_path))
    expected_outputs, expected_logits = generate_in_process(one, PROMPTS, MAX_TOKENS)
    split_bytes, whole_bytes = weight_bytes(one.config)
    num_layers, total_kv_heads, head_dim = one.model.kv_cache_shape()

    ranks = distributed.run_local_ranks(world_size, rank_generate, tmp_path, MAX_TOKENS)
    for rank, (outputs, logits, held_bytes, kv_shape) in enumerate(ranks):
        assert outputs == expected_outputs, f"rank {rank}"
        torch.testing.assert_close(torch.from_numpy(logits), torch.stack(expected_logits), atol=1e-4, rtol=0)
        # 1/N of the split weights (a little more where KV heads are replicated), the rest whole.
        held_split, held_whole = held_bytes
        assert split_bytes / world_size <= held_split <= 1.05 * split_bytes / world_size, f"rank {rank}"
        assert held_whole == whole_bytes and whole_bytes < split_bytes / 5
        assert kv_shape == (num_layers, max(1, total_kv_heads // world_size), head_dim)


def test_dummy_weights_are_the_same_model_at_any_size(tmp_path):
    """Dummy weights are seeded per checkpoint tensor, so ranks slice the one same random model."""
    tiny_models.build("qwen2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    expected = generate_in_process(ModelRunner(runner_config(tmp_path, load_format="dummy")), PROMPTS, 2)
    for outputs, logits, _, _ in distributed.run_local_ranks(2, rank_generate, tmp_path, 2, "dummy"):
        assert outputs == expected[0]
        torch.testing.assert_close(torch.from_numpy(logits), torch.stack(expected[1]), atol=1e-4, rtol=0)


def test_random_sampling_at_tp2_draws_what_one_rank_draws(tmp_path):
    """Every rank seeds its sampler alike and samples the same logits: the ranks agree with each
    other (their batches must hold the same tokens) and with one rank."""
    tiny_models.build("llama", tmp_path)
    one = ModelRunner(runner_config(tmp_path))
    expected, _ = generate_in_process(one, PROMPTS, 8, temperature=1.0)
    assert expected != generate_in_process(one, PROMPTS, 8)[0]  # the draws are random, not greedy
    for outputs, _, _, _ in distributed.run_local_ranks(2, rank_generate, tmp_path, 8, "auto", 1.0):
        assert outputs == expected


@pytest.mark.parametrize("hidden, heads, kv_heads, message", [
    (64, 8, 8, "num_attention_heads=8 is neither a multiple of the tensor parallel size 3"),
    (96, 12, 4, "num_key_value_heads=4 is neither a multiple of the tensor parallel size 3 nor a divisor of it"),
])
def test_heads_that_do_not_split_are_a_load_error(tmp_path, monkeypatch, hidden, heads, kv_heads, message):
    tiny_models.build("llama", tmp_path, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads)
    # Building and loading a rank's share needs no communication: rank 0 of 3, without the group.
    monkeypatch.setattr(distributed, "_world_size", 3)
    with pytest.raises(RuntimeError, match=f"config.json: {message}$"):
        ModelRunner(runner_config(tmp_path, world_size=3))


# ----- through the stack -------------------------------------------------------------------------


def test_opt_at_tp2_through_the_stack_matches_transformers(tmp_path):
    model_dir = tmp_path / "opt"
    tiny_models.build("opt", model_dir)
    with run_stack(model_dir, "--tensor-parallel-size", "2", log_dir=tmp_path) as stack:
        assert stack.scheduler.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).tensor_parallel_size == 2
        outputs = generate_all(stack, PROMPTS, 8)
    for prompt, output in zip(PROMPTS, outputs):
        assert output == hf_reference.greedy(model_dir, prompt, 8, ignore_eos=True)


def test_qwen2_at_tp2_matches_transformers_and_a_request_outlives_a_killed_rank(tmp_path):
    model_dir = tmp_path / "qwen2"
    tiny_models.build("qwen2", model_dir)
    with run_stack(model_dir, "--tensor-parallel-size", "2", "--max-model-len", "4096", log_dir=tmp_path) as stack:
        outputs = generate_all(stack, PROMPTS, 8)
        for prompt, output in zip(PROMPTS, outputs):
            assert output == hf_reference.greedy(model_dir, prompt, 8, ignore_eos=True)

        # A long request; once its first tokens are back, rank 1 dies. The launcher restarts
        # both ranks, and the scheduler resumes the request: it ends as an undisturbed run does.
        params = pb.SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        request = pb.GenerateRequest(prompt_token_ids=[7], params=params)
        expected = [t for reply in stack.scheduler.Generate(request, timeout=600) for t in reply.token_ids]
        rank1 = int(re.search(r"started worker 1 \(pid (\d+)\)", stack.log()).group(1))
        replies = stack.scheduler.Generate(request, timeout=600)
        received = list(next(replies).token_ids)
        os.kill(rank1, signal.SIGKILL)
        for reply in replies:
            received.extend(reply.token_ids)
        assert received == expected
        assert "worker 1 exited with code -9; restarting" in stack.log()
        assert stack.stats().num_requests_resumed == 1


def test_smollm2_at_tp3_gives_the_same_completions_as_one_rank(model_dir, smol_stack, tmp_path):
    """9 query heads and 3 KV heads over 3 ranks: one KV head each."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]

    def complete(stack):  # one request for the three prompts: they share each step
        client = OpenAI(base_url=stack.base_url, api_key="none")
        reply = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompts, max_tokens=10, temperature=0)
        return [choice.text for choice in sorted(reply.choices, key=lambda c: c.index)]

    with run_stack(model_dir, "--tensor-parallel-size", "3", "--served-model-name", "SmolLM2-135M-Instruct",
                   "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20), log_dir=tmp_path) as stack:
        assert stack.scheduler.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).tensor_parallel_size == 3
        sharded = complete(stack)
    assert sharded == complete(smol_stack)
    assert all(text.strip() for text in sharded)
