"""Reliability through the real processes (`pagedserve serve`): bad input, a fuzz run, clients
that leave, overload, a worker killed under load, and a load test. (The scheduler killed and
restarted is in test_ops.py, on the stack that also tests health checks and SIGTERM.)

The tests that only send requests share the session's SmolLM2 stack; those that overload or kill
processes share one stack of their own with a tiny batch and waiting queue."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference
from tests.helpers.live_stack import (children, health_status, open_fds, poll, prompt_ids, scrape,
                               wait_for_child)
from tests.helpers.stack import run_stack

MODEL = "SmolLM2-135M-Instruct"
VOCAB = 49152
BODY_LIMIT = 16 << 20  # the router's default --max-request-body-bytes
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def max_model_len(smol_stack) -> int:
    return httpx.get(smol_stack.base_url + "/models", timeout=10).json()["data"][0]["max_model_len"]


def assert_openai_error(reply: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else error["type"])
    if param != "any":
        assert error["param"] == param, error
    return error


# ----- bad input ---------------------------------------------------------------------------------

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
# How long a client waits for one reply: a guard against a hang, not a bound on speed (a busy
# machine may take minutes where a quiet one takes seconds).
TIMEOUT = 600
HI = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}


# (path, body: a dict sent as JSON or raw bytes, expected status, the `param` the error names)
BAD_INPUT = {
    "malformed JSON": (CHAT, b'{"model": "x", "messages": [', 400, None),
    "not an object": (CHAT, b"[1, 2, 3]", 400, None),
    "empty body": (COMPLETIONS, b"", 400, None),
    "invalid UTF-8": (COMPLETIONS, b'{"prompt": "\xff\xfe caf\xe9", "max_tokens": 2}', 400, None),
    "messages a string": (CHAT, chat(messages="Hi"), 400, "messages"),
    "max_tokens a string": (CHAT, chat(max_tokens="5"), 400, "max_tokens"),
    "stream a string": (CHAT, chat(stream="yes"), 400, "stream"),
    "stop a number": (COMPLETIONS, completion(stop=5), 400, "stop"),
    "temperature a list": (CHAT, chat(temperature=[1]), 400, "temperature"),
    "role a list": (CHAT, chat(messages=[{"role": ["user"], "content": "Hi"}]), 400,
                    "messages[0].role"),
    "content a number": (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
                         "messages[0].content"),
    "messages missing": (CHAT, {"model": MODEL, "max_tokens": 2}, 400, "messages"),
    "messages empty": (CHAT, chat(messages=[]), 400, "messages"),
    "unknown role": (CHAT, chat(messages=[{"role": "robot", "content": "Hi"}]), 400,
                     "messages[0].role"),
    "max_tokens 0": (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    "max_tokens negative": (COMPLETIONS, completion(max_tokens=-3), 400, "max_tokens"),
    "max_tokens huge": (COMPLETIONS, completion(max_tokens=2 ** 40), 400, "max_tokens"),
    "n 0": (CHAT, chat(n=0), 400, "n"),
    "n above the limit": (CHAT, chat(n=129), 400, "n"),
    "negative temperature": (CHAT, chat(temperature=-0.5), 400, "temperature"),
    "top_p 0": (CHAT, chat(top_p=0), 400, "top_p"),
    "top_p above 1": (COMPLETIONS, completion(top_p=1.01), 400, "top_p"),
    "top_k huge": (COMPLETIONS, completion(top_k=2 ** 40), 400, "top_k"),
    "NaN penalty": (COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 2, "presence_penalty": NaN}',
                    400, "presence_penalty"),
    "logit_bias key beyond the vocabulary": (CHAT, chat(logit_bias={str(VOCAB): 5}), 400,
                                             "logit_bias"),
    "logit_bias key negative": (CHAT, chat(logit_bias={"-1": 5}), 400, "logit_bias"),
    "logit_bias key not a number": (CHAT, chat(logit_bias={"abc": 5}), 400, "logit_bias"),
    "token id beyond the vocabulary": (COMPLETIONS, completion(prompt=[1, VOCAB]), 400, "prompt"),
    "negative token id": (COMPLETIONS, completion(prompt=[[5, 6], [-1]]), 400, "prompt"),
    "stop_token_ids beyond the vocabulary": (COMPLETIONS, completion(stop_token_ids=[VOCAB]),
                                             400, "stop_token_ids"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_4xx_in_openai_shape_and_the_server_keeps_serving(smol_stack, case):
    path, body, status, param = BAD_INPUT[case]
    if isinstance(body, dict):
        reply = httpx.post(smol_stack.base_url + path, json=body, timeout=TIMEOUT)
    else:
        reply = httpx.post(smol_stack.base_url + path, content=body, timeout=TIMEOUT,
                           headers={"content-type": "application/json"})
    assert_openai_error(reply, status, param)
    assert health_status(smol_stack.root_url) == 200


def test_prompts_beyond_the_context_are_400(smol_stack, max_model_len):
    url = smol_stack.base_url + COMPLETIONS
    too_long = httpx.post(url, json=completion(prompt=[300] * (max_model_len + 1)), timeout=TIMEOUT)
    assert assert_openai_error(too_long, 400, "prompt")["code"] == "context_length_exceeded"
    no_room = httpx.post(url, json=completion(prompt=[300] * 10, max_tokens=max_model_len),
                         timeout=TIMEOUT)
    assert assert_openai_error(no_room, 400, "max_tokens")["code"] == "context_length_exceeded"


def test_bodies_over_the_size_limit_are_413(smol_stack):
    url = smol_stack.base_url + COMPLETIONS
    big = json.dumps(completion(prompt="a" * BODY_LIMIT)).encode()
    declared = httpx.post(url, content=big, headers={"content-type": "application/json"},
                          timeout=TIMEOUT)
    assert assert_openai_error(declared, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the router must count as it reads
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "application/json"},
                         timeout=TIMEOUT)
    assert assert_openai_error(chunked, 413)["code"] == "request_too_large"
    assert httpx.post(url, json=completion(), timeout=TIMEOUT).status_code == 200


def test_unknown_routes_and_methods_answer_in_openai_shape(smol_stack):
    assert_openai_error(httpx.get(smol_stack.base_url + "/nothing-here", timeout=10), 404)
    assert_openai_error(httpx.get(smol_stack.base_url + CHAT, timeout=10), 405)


@pytest.mark.parametrize("params, prompt, field", [
    ({}, [], "prompt_token_ids"),
    ({}, [VOCAB], "prompt_token_ids"),
    ({"max_tokens": 0}, [1, 2], "max_tokens"),
    ({"temperature": -1}, [1, 2], "temperature"),
    ({"top_p": 1.5}, [1, 2], "top_p"),
    ({"n": 0}, [1, 2], "n"),
    ({"logprobs": 21}, [1, 2], "logprobs"),
    ({"logit_bias": {VOCAB: 1.0}}, [1, 2], "logit_bias"),
    ({"stop_token_ids": [-1]}, [1, 2], "stop_token_ids"),
    ({"max_tokens": 2, "min_tokens": 3}, [1, 2], "min_tokens"),
])
def test_scheduler_rejects_invalid_grpc_requests_naming_the_field(smol_stack, params, prompt,
                                                                 field):
    request = pb.GenerateRequest(prompt_token_ids=prompt, params=pb.SamplingParams(**params))
    with pytest.raises(grpc.RpcError) as err:
        list(smol_stack.scheduler.Generate(request, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")


# ----- fuzz --------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
# max_tokens is either small or something the router must refuse: a fuzzed request may not run
# for thousands of tokens.
NOT_A_SMALL_COUNT = JSON.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float))
                                or abs(v) > 10 ** 6 or v != int(v))
TEXT_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                   "text": st.text(max_size=12)})
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "developer", "robot"]) | JSON,
    "content": st.text(max_size=30) | st.lists(TEXT_PART, max_size=2) | JSON})
PROMPT = (st.text(max_size=30) | st.lists(st.integers(-3, VOCAB + 3), max_size=8)
          | st.lists(st.text(max_size=8), max_size=3)
          | st.lists(st.lists(st.integers(-2, VOCAB + 2), max_size=4), max_size=3) | JSON)
SAMPLING = {
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, VOCAB * 2),
    "min_p": st.floats(-0.5, 1.5), "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3), "repetition_penalty": st.floats(-1, 3),
    "n": st.integers(-1, 3), "best_of": st.integers(-1, 3), "seed": st.integers(-2 ** 70, 2 ** 70),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
    "stop_token_ids": st.lists(st.integers(-3, VOCAB + 3), max_size=3),
    "logit_bias": st.dictionaries(st.integers(-3, VOCAB + 3).map(str) | st.text(max_size=3),
                                  st.floats(-150, 150), max_size=3),
    "ignore_eos": st.booleans(), "min_tokens": st.integers(-1, 5), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "echo": st.booleans(), "logprobs": st.booleans() | st.integers(-1, 21),
    "top_logprobs": st.integers(-1, 21), "skip_special_tokens": st.booleans(),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "user": st.text(max_size=5), "add_generation_prompt": st.booleans(),
}
OPTIONAL = {name: strategy | JSON for name, strategy in SAMPLING.items()}


def bodies(input_field: str, inputs) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"model": st.just(MODEL) | JSON, "max_tokens": st.integers(-1, 3) | NOT_A_SMALL_COUNT,
         input_field: inputs},
        optional=OPTIONAL)


REQUESTS = st.one_of(
    st.tuples(st.just(CHAT), bodies("messages", st.lists(MESSAGE, max_size=3) | JSON)),
    st.tuples(st.just(COMPLETIONS), bodies("prompt", PROMPT)),
    st.tuples(st.sampled_from([CHAT, COMPLETIONS]), st.binary(max_size=40)))
FUZZ_EXAMPLES = int(os.environ.get("PAGEDSERVE_FUZZ_EXAMPLES", "40"))


def send_fuzzed(client: httpx.Client, base_url: str, path: str, body) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client.stream("POST", base_url + path, content=content,
                       headers={"content-type": "application/json"}) as reply:
        raw = reply.read()  # a hang fails here, on the client's timeout
    assert reply.status_code < 500, raw[:500]
    if reply.status_code >= 400:
        assert set(json.loads(raw)["error"]) == ERROR_KEYS
    elif reply.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not [e for e in events[:-1] if "error" in json.loads(e)], raw[:500]
    else:
        assert json.loads(raw)["choices"]


def test_fuzzed_requests_get_no_5xx_and_no_hang(smol_stack):
    with httpx.Client(timeout=TIMEOUT) as client:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(REQUESTS)
        def fuzz(request):
            send_fuzzed(client, smol_stack.base_url, *request)

        fuzz()
    stats = smol_stack.wait_idle()
    assert (stats.kv_blocks_used, stats.num_requests_running) == (0, 0)
    assert health_status(smol_stack.root_url) == 200


# ----- clients that leave ------------------------------------------------------------------------

async def stream_completion(client: httpx.AsyncClient, url: str, body: dict,
                            leave_after: int | None = None) -> str | None:
    """The streamed text, or None when the client left after `leave_after` events."""
    text, events = "", 0
    async with client.stream("POST", url, json={**body, "stream": True}) as reply:
        assert reply.status_code == 200, await reply.aread()
        if leave_after == 0:
            return None
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                return text
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += "".join(c["text"] for c in chunk["choices"])
                events += 1
                if events == leave_after:
                    return None  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


def test_100_streams_of_which_50_disconnect_leave_nothing_behind(smol_stack, model_dir,
                                                                 tokenizer):
    prompts = [prompt_ids(tokenizer, f"Story {i}: once upon a time in {city}, there was")
               for i, city in enumerate(["Paris", "Rome", "Cairo", "Lima"])]
    max_tokens = 8
    expected = [tokenizer.decode(hf_reference.greedy(model_dir, p, max_tokens, ignore_eos=True),
                                 skip_special_tokens=True) for p in prompts]
    rng = random.Random(11)
    leaving = set(rng.sample(range(100), 50))
    url = smol_stack.base_url + COMPLETIONS

    async def one(client, i: int):
        body = {"model": MODEL, "prompt": prompts[i % 4], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        if i not in leaving:
            return await stream_completion(client, url, body)
        if i % 2:  # leave after some events
            return await stream_completion(client, url, body, rng.randrange(0, max_tokens))
        try:  # or at a random moment: while queued, before the headers, mid-stream
            return await asyncio.wait_for(stream_completion(client, url, body),
                                          rng.uniform(0.05, 3.0))
        except asyncio.TimeoutError:
            return None

    async def run_all():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    results = asyncio.run(asyncio.wait_for(run_all(), 300))
    for i, text in enumerate(results):
        if i not in leaving:
            assert text == expected[i % 4], f"stream {i}"
    stats = smol_stack.wait_idle()
    assert (stats.kv_blocks_used, stats.num_requests_running, stats.num_requests_waiting) == \
        (0, 0, 0)
    assert scrape(smol_stack.root_url)[("pagedserve_router_requests_in_flight", ())] == 0


# ----- load --------------------------------------------------------------------------------------

def test_load_500_requests_at_concurrency_64_without_error_or_leak(smol_stack):
    launcher = smol_stack.proc.pid
    pids = children(launcher)
    fds_before = {role: open_fds(pids[role]) for role in ("router", "scheduler")}
    concurrency, total = 64, 500

    async def one(client, limit: asyncio.Semaphore, i: int) -> None:
        async with limit:
            if i % 3 == 0:
                reply = await client.post(smol_stack.base_url + CHAT, json={
                    "model": MODEL, "max_tokens": 2,
                    "messages": [{"role": "user", "content": f"Say a number near {i}."}]})
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
            elif i % 3 == 1:
                text = await stream_completion(client, smol_stack.base_url + COMPLETIONS, {
                    "model": MODEL, "prompt": f"Load test {i}:", "max_tokens": 2})
                assert text is not None
            else:
                reply = await client.post(smol_stack.base_url + COMPLETIONS, json={
                    "model": MODEL, "prompt": [1000 + i % 50, 2000 + i], "max_tokens": 2})
                assert reply.status_code == 200, reply.text
                assert reply.json()["usage"]["completion_tokens"] >= 1

    async def run_all() -> float:
        started = time.monotonic()
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=100)) \
                as client:
            await asyncio.gather(*(one(client, limit, i) for i in range(total)))
        return time.monotonic() - started

    elapsed = asyncio.run(asyncio.wait_for(run_all(), 3 * TIMEOUT))
    print(f"{total} requests at concurrency {concurrency} in {elapsed:.1f} s "
          f"({total / elapsed:.1f} req/s)")
    stats = smol_stack.wait_idle()
    assert (stats.kv_blocks_used, stats.num_requests_running, stats.num_requests_waiting) == \
        (0, 0, 0)
    assert scrape(smol_stack.root_url)[("pagedserve_router_requests_in_flight", ())] == 0
    assert children(launcher) == pids  # nothing crashed and restarted
    for role, before in fds_before.items():
        assert open_fds(pids[role]) <= before + 8, role


# ----- overload and a crashed worker (a stack of their own) --------------------------------------

@pytest.fixture(scope="module")
def small_stack(model_dir, tmp_path_factory):
    flags = ("--served-model-name", MODEL, "--kv-cache-memory-bytes", str(256 << 20),
             "--max-model-len", "2048", "--max-num-seqs", "2", "--max-waiting-requests", "2")
    with run_stack(model_dir, *flags, log_dir=tmp_path_factory.mktemp("reliability")) as stack:
        yield stack


def timed_post(url: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = httpx.post(url, json=body, timeout=TIMEOUT)
    return reply, time.monotonic() - started


def test_beyond_the_waiting_queue_requests_get_503_with_retry_after_at_once(small_stack):
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 32, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: timed_post(small_stack.base_url + COMPLETIONS, body),
                                range(8)))
    served = [t for r, t in results if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code != 200]
    # 2 run and 2 wait at most; all 8 may arrive before the first step admits any.
    assert 2 <= len(served) <= 4
    for reply, took in refused:
        error = assert_openai_error(reply, 503)
        assert error["code"] == "server_overloaded" and reply.headers["retry-after"] == "1"
        assert took < min(served)  # answered while the admitted ones still ran
    stats = small_stack.wait_idle()
    assert (stats.kv_blocks_used, stats.num_requests_running) == (0, 0)


def test_worker_killed_under_load_holds_its_requests_and_they_complete(small_stack, model_dir,
                                                                       tokenizer):
    """The scheduler keeps the requests in flight (running and waiting) through the lost worker,
    and once the launcher has restarted it they are recomputed and end as if nothing happened
    (token-identical outputs: tests/stack/test_resume.py)."""
    stack, launcher = small_stack, small_stack.proc.pid
    before = children(launcher)
    url = stack.base_url + COMPLETIONS
    # Three full KV blocks' worth: the prefix cache holds them once this prompt has run.
    prompt = prompt_ids(tokenizer, " ".join(f"river {i} flows to the sea;" for i in range(12)))
    assert len(prompt) > 48
    assert httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 2},
                      timeout=TIMEOUT).status_code == 200
    max_tokens = 160
    long = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": max_tokens,
            "ignore_eos": True}
    resumed = stack.stats().num_requests_resumed

    def in_flight(stream: bool) -> tuple[int, list, int]:
        """(its HTTP status, the errors it got, its completion tokens)."""
        if not stream:
            reply = httpx.post(url, json=long, timeout=TIMEOUT)
            body = reply.json()
            return reply.status_code, [body["error"]] if "error" in body else [], \
                body.get("usage", {}).get("completion_tokens", 0)
        body = {**long, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as reply:
            if reply.status_code != 200:
                return reply.status_code, [json.loads(reply.read())["error"]], 0
            chunks = [json.loads(line[6:]) for line in reply.iter_lines()
                      if line.startswith("data: {")]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        return 200, [c["error"] for c in chunks if "error" in c], \
            usage[-1]["completion_tokens"] if usage else 0

    with ThreadPoolExecutor(4) as pool:
        # Two running (one streamed), then two waiting behind them (one streamed).
        futures = [pool.submit(in_flight, stream) for stream in (True, False)]
        poll(lambda: stack.stats().num_requests_running == 2, TIMEOUT)
        futures += [pool.submit(in_flight, stream) for stream in (True, False)]
        poll(lambda: stack.stats().num_requests_waiting == 2, TIMEOUT)
        os.kill(before["worker"], signal.SIGKILL)
        _, took = poll(lambda: health_status(stack.root_url) == 503, 60)
        print(f"/health answered 503 {took:.1f} s after the worker was killed")
        ended = [f.result(timeout=TIMEOUT) for f in futures]
    assert ended == [(200, [], max_tokens)] * 4
    assert stack.stats().num_requests_resumed - resumed == 4
    assert scrape(stack.root_url)[("pagedserve:num_requests_resumed_total", ())] >= 4

    wait_for_child(launcher, "worker", not_pid=before["worker"])
    poll(lambda: health_status(stack.root_url) == 200, 240, interval=0.5)
    now = children(launcher)
    assert (now["router"], now["scheduler"]) == (before["router"], before["scheduler"])
    assert "worker 0 exited with code -9; restarting worker 0" in stack.log()
    stats = stack.wait_idle()
    assert (stats.kv_blocks_used, stats.num_requests_running, stats.num_requests_waiting) == \
        (0, 0, 0)
    # The lost worker's cache is forgotten: the prompt is computed again, and correctly.
    expected = tokenizer.decode(hf_reference.greedy(model_dir, prompt, 6), skip_special_tokens=True)
    for run in range(2):
        hits = stack.stats().prefix_cache_hits
        reply = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 6,
                                      "temperature": 0}, timeout=TIMEOUT)
        assert reply.json()["choices"][0]["text"] == expected
        reused = stack.stats().prefix_cache_hits - hits
        assert (reused > 0) == (run == 1)  # nothing the first time, its own blocks the second
