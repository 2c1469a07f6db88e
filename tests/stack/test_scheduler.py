"""The scheduler's promises through the real processes (worker, scheduler, router, real gRPC):
preemption under a tiny KV cache, a 7,000-token prompt by chunked prefill, prefix-cache hits."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference
from tests.helpers.stack import run_stack

BLOCK_SIZE = 16


def corpus_ids(model_dir, min_tokens: int) -> list[int]:
    """Token ids of a long, varied English text (so greedy continuations differ between prompts)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cities = ["Paris", "Lyon", "Rome", "Kyoto", "Lima", "Oslo", "Cairo", "Quito", "Accra", "Hanoi"]
    topics = ["rivers", "bridges", "markets", "libraries", "trains", "gardens", "harbours"]
    sentences, ids = [], []
    i = 0
    while len(ids) < min_tokens:
        city, topic = cities[i % len(cities)], topics[(i * 3) % len(topics)]
        sentences.append(f"Note {i}: in {city}, people still talk about the {topic} built in year "
                         f"{1200 + 37 * i}, and about who paid for them.")
        i += 1
        if i % 50 == 0:
            ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    return ids[:min_tokens]


def stream_times(stub, prompt: list[int], max_tokens: int, first_token: threading.Event | None = None) -> list[float]:
    """The monotonic time at which each token of a greedy generation arrived."""
    request = pb.GenerateRequest(prompt_token_ids=prompt, params=pb.SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True))
    times = []
    for reply in stub.Generate(request, timeout=1800):  # a hang guard: a busy machine is slow
        times.extend(time.monotonic() for _ in reply.token_ids)
        if first_token is not None:
            first_token.set()
    return times


# ----- preemption -----------------------------------------------------------------------------

def test_32_requests_through_a_cache_for_4_all_finish_as_with_a_large_cache(model_dir, smol_stack, tmp_path):
    """The small stack also runs --async-scheduling (each plan sent while the step before it runs,
    sequences preempted while their step runs): its outputs are still the big stack's, which runs
    without it."""
    ids = corpus_ids(model_dir, 2000)
    prompts = [ids[37 * i: 37 * i + 20 + (i * 7) % 60] for i in range(32)]  # 20 to 79 tokens
    max_tokens = 24
    # Each request needs at most ceil((79 + 24) / 16) = 7 blocks: 28 blocks hold about 4 of them.
    with run_stack(model_dir, "--num-gpu-blocks-override", "28", "--no-enable-prefix-caching",
                   "--async-scheduling", log_dir=tmp_path) as small:
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda p: small.generate(p, max_tokens, ignore_eos=True), prompts))
        stats = small.wait_idle()
        assert stats.kv_blocks_total == 28
        assert stats.num_preemptions > 0, "a cache for 4 requests served 32 without preempting"
        assert stats.kv_blocks_used == 0 and stats.num_requests_running == 0

        # A request that could never fit is refused at once, not queued forever.
        too_big = pb.GenerateRequest(prompt_token_ids=ids[:28 * BLOCK_SIZE + 1],
                                     params=pb.SamplingParams(max_tokens=4))
        with pytest.raises(grpc.RpcError) as err:  # queued, it would end in DEADLINE_EXCEEDED
            list(small.scheduler.Generate(too_big, timeout=120))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with ThreadPoolExecutor(8) as pool:
        expected = list(pool.map(lambda p: smol_stack.generate(p, max_tokens, ignore_eos=True), prompts))
    assert all(len(out) == max_tokens for out in got)
    assert got == expected


# ----- long sequences -------------------------------------------------------------------------

def test_7000_token_prompt_by_chunked_prefill_equals_transformers_while_short_ones_stream(model_dir, smol_stack):
    ids = corpus_ids(model_dir, 7200)
    long_prompt, short_prompt = ids[:7000], ids[7000:7040]
    short_started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        short_times = pool.submit(stream_times, smol_stack.scheduler, short_prompt, 400, short_started)
        assert short_started.wait(120)
        long_sent = time.monotonic()
        long_times = pool.submit(stream_times, smol_stack.scheduler, long_prompt, 8)
        first_long_token = long_times.result()[0]
        short = short_times.result()
    # The long prompt is computed in chunks of at most --max-num-batched-tokens (2048), each step
    # leaving room for the running decode: the short request keeps streaming through the prefill.
    during = sum(long_sent < t < first_long_token for t in short)
    assert during >= 3, f"the short stream got {during} tokens during the 4-chunk prefill"

    got = smol_stack.generate(long_prompt, 8)
    assert got == hf_reference.greedy(model_dir, long_prompt, 8)


# ----- prefix caching -------------------------------------------------------------------------

def test_shared_system_prompt_blocks_are_hits_after_the_first_request(model_dir, smol_stack):
    ids = corpus_ids(model_dir, 3000)
    system = ids[2000:2500]  # text no other test sends, so nothing of it is cached yet
    questions = [ids[100 * i: 100 * i + 10 + i] for i in range(16)]
    shared_full_blocks = len(system) // BLOCK_SIZE

    smol_stack.generate(system + questions[0], 2)
    before = smol_stack.stats()
    with ThreadPoolExecutor(15) as pool:
        list(pool.map(lambda q: smol_stack.generate(system + q, 2), questions[1:]))
    after = smol_stack.stats()

    hit_tokens = after.prefix_cache_hits - before.prefix_cache_hits
    shared_tokens = 15 * shared_full_blocks * BLOCK_SIZE
    assert hit_tokens >= 0.9 * shared_tokens, f"{hit_tokens} of {shared_tokens} shared tokens hit"
    queried = after.prefix_cache_queries - before.prefix_cache_queries
    assert queried == sum(len(system) + len(q) for q in questions[1:])
