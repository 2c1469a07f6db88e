"""End to end through the real processes: openai SDK -> router -> scheduler -> worker, and the
public gRPC API, on SmolLM2-135M-Instruct; transformers is the judge of the token ids."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference

MODEL = "SmolLM2-135M-Instruct"
LENGTHS = [5, 17, 40, 64, 111, 190, 300, 400]


@pytest.fixture(scope="module")
def stack(smol_stack):
    return smol_stack


@pytest.fixture(scope="module")
def client(stack):
    return OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def prompts(model_dir):
    """Eight prompts of 5 to 400 tokens, cut from one long text."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = " ".join(
        f"Paragraph {i}: the city of {city} has a long history of trade, art and science, and its "
        f"people tell stories about rivers, bridges and markets that open before dawn."
        for i, city in enumerate(["Paris", "Lyon", "Rome", "Kyoto", "Lima", "Oslo", "Cairo", "Quito"] * 3))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= max(LENGTHS)
    return [ids[:n] for n in LENGTHS]


def test_chat_answers_paris(client):
    reply = client.chat.completions.create(
        model=MODEL, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_concurrent_grpc_generations_equal_transformers(stack, model_dir, prompts):
    def generate(ids):
        request = pb.GenerateRequest(prompt_token_ids=ids,
                                     params=pb.SamplingParams(temperature=0, max_tokens=32))
        out = []
        for reply in stack.scheduler.Generate(request, timeout=300):
            out.extend(reply.token_ids)
        return out

    with ThreadPoolExecutor(len(prompts)) as pool:
        ours = list(pool.map(generate, prompts))
    for ids, got in zip(prompts, ours):
        assert got == hf_reference.greedy(model_dir, ids, 32), f"prompt of {len(ids)} tokens"


def test_concurrent_completions_equal_transformers_text(client, model_dir, prompts):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def complete(ids):
        return client.completions.create(model=MODEL, prompt=ids, max_tokens=32, temperature=0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(complete, prompts))
    for ids, reply in zip(prompts, replies):
        expected = hf_reference.greedy(model_dir, ids, 32)
        assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == len(expected)


def test_idle_server_holds_no_kv_blocks(stack, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    stats = stack.wait_idle()
    assert stats.kv_blocks_used == 0
    assert stats.num_requests_running == 0 and stats.num_requests_waiting == 0
    assert stats.kv_blocks_total > 0 and stats.generation_tokens_total > 0
