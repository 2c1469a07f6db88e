"""Operations through the real processes (`pagedserve serve`): Prometheus metrics under vLLM's
names, request ids in the logs, health checks, a scheduler killed and brought back, and graceful
shutdown on SIGTERM. (The compose file is checked in test_compose.py.)"""
from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from pagedserve.entrypoints import healthcheck
from pagedserve.entrypoints.launcher import free_port
from tests.helpers import hf_reference
from tests.helpers.live_stack import (children, delta, health_status, poll, prompt_ids, scrape,
                               wait_for_child)
from tests.helpers.stack import run_stack

MODEL = "SmolLM2-135M-Instruct"
# A stack of its own for the tests that kill processes: a small cache keeps its memory small.
OWN_STACK_FLAGS = ("--served-model-name", MODEL, "--kv-cache-memory-bytes", str(256 << 20),
                   "--shutdown-timeout", "600",  # ample for 8 streams on a busy machine
                   "--max-model-len", "2048",
                   # a request in flight when the scheduler dies waits this long to be resumed
                   # on the restarted one, then fails (the launcher is paused in that test)
                   "--resume-timeout", "5")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


# ----- metrics -----------------------------------------------------------------------------------

def test_metrics_count_a_small_load_exactly(smol_stack, tokenizer):
    client = OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=600)
    prompts = [prompt_ids(tokenizer, f"Metrics test {i}: count the rivers of {city}.")
               for i, city in enumerate(["Lima", "Oslo", "Kyoto", "Quito"])]
    max_tokens = 24
    smol_stack.wait_idle()
    before = scrape(smol_stack.root_url)

    def complete(i: int) -> int:
        kw = dict(model=MODEL, prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:  # half streamed: both paths must be measured
            chunks = list(client.completions.create(stream=True,
                                                    stream_options={"include_usage": True}, **kw))
            return chunks[-1].usage.completion_tokens
        return client.completions.create(**kw).usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, i) for i in range(len(prompts))]
        during = []
        while not all(f.done() for f in futures):
            during.append(scrape(smol_stack.root_url))
            time.sleep(0.05)
        completion_tokens = [f.result() for f in futures]
    assert completion_tokens == [max_tokens] * len(prompts)
    assert max(d[("pagedserve:num_requests_running", ())] for d in during) >= 1
    assert max(d[("pagedserve:kv_cache_usage_perc", ())] for d in during) > 0

    smol_stack.wait_idle()
    after = scrape(smol_stack.root_url)
    n, prompt_tokens = len(prompts), sum(len(p) for p in prompts)
    assert delta(after, before, "pagedserve:prompt_tokens_total") == prompt_tokens
    assert delta(after, before, "pagedserve:generation_tokens_total") == n * max_tokens
    assert delta(after, before, "pagedserve:prefix_cache_queries_total") == prompt_tokens
    assert delta(after, before, "pagedserve:request_success_total",
                 finished_reason="length") == n
    assert delta(after, before, "pagedserve:time_to_first_token_seconds_count") == n
    assert delta(after, before, "pagedserve:e2e_request_latency_seconds_count") == n
    # One inter-token gap per token after each sequence's first.
    assert delta(after, before, "pagedserve:inter_token_latency_seconds_count") == \
        n * (max_tokens - 1)
    assert delta(after, before, "pagedserve:e2e_request_latency_seconds_sum") > \
        delta(after, before, "pagedserve:time_to_first_token_seconds_sum") > 0
    assert after[("pagedserve:num_requests_running", ())] == 0
    assert after[("pagedserve:num_requests_waiting", ())] == 0
    assert after[("pagedserve:kv_cache_usage_perc", ())] == 0
    assert after[("pagedserve_router_requests_in_flight", ())] == 0
    for name in ("num_preemptions_total", "prefix_cache_hits_total"):
        assert ("pagedserve:" + name, ()) in after


# ----- request ids -------------------------------------------------------------------------------

def test_request_id_is_echoed_and_names_every_log_line_of_its_request(smol_stack):
    given = f"ops-{uuid.uuid4().hex[:12]}"
    reply = httpx.post(smol_stack.base_url + "/chat/completions", timeout=60,
                       headers={"X-Request-Id": given},
                       json={"model": MODEL, "max_tokens": 3,
                             "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == given
    assert reply.json()["id"] == f"chatcmpl-{given}"
    rejected = httpx.post(smol_stack.base_url + "/completions", json={"max_tokens": -1},
                          headers={"X-Request-Id": given + "-bad"}, timeout=10)
    assert rejected.status_code == 400 and rejected.headers["x-request-id"] == given + "-bad"
    made_up = httpx.get(smol_stack.base_url + "/models", timeout=10).headers["x-request-id"]

    def lines_with(text: str) -> list[str]:
        return poll(lambda: [line for line in smol_stack.log().splitlines() if text in line], 10)[0]

    mine = lines_with(given)
    assert any(f"[{given}]" in line and "POST /v1/chat/completions" in line for line in mine)
    # The scheduler's id for the request starts with the client's: its lines carry it too.
    assert any("scheduler" in line and "queued" in line for line in mine)
    assert any("scheduler" in line and "finished" in line for line in mine)
    assert any(f"[{given}-bad]" in line and " 400" in line for line in lines_with(given + "-bad"))
    assert any(f"[{made_up}]" in line and "GET /v1/models" in line for line in lines_with(made_up))
    # Every line the router logs while serving a request names it: no access line lacks an id.
    access = [line for line in smol_stack.log().splitlines() if "uvicorn.access" in line]
    assert access and not [line for line in access if "[-]" in line]


# ----- health --------------------------------------------------------------------------------------

def test_health_checks_of_every_process(smol_stack):
    """The same commands Docker runs (python -m pagedserve.entrypoints.healthcheck)."""
    def exit_code(*argv: str) -> int:
        with pytest.raises(SystemExit) as done:
            healthcheck.main(list(argv))
        return done.value.code

    assert exit_code("grpc", smol_stack.grpc_address) == 0
    assert exit_code("http", smol_stack.root_url + "/health") == 0
    assert exit_code("grpc", f"127.0.0.1:{free_port()}") == 1
    assert exit_code("http", f"http://127.0.0.1:{free_port()}/health") == 1
    assert health_status(smol_stack.root_url) == 200


@pytest.fixture(scope="module")
def own_stack(model_dir, tmp_path_factory):
    with run_stack(model_dir, *OWN_STACK_FLAGS, log_dir=tmp_path_factory.mktemp("ops")) as stack:
        yield stack


def test_killed_scheduler_health_503_then_recovers_by_itself(own_stack, model_dir, tokenizer):
    """Issue 7's health acceptance and issue 11's scheduler restart: the router answers 503
    while the scheduler is gone (issue 7 asks for it within 5 s: the time is printed, not
    asserted, since a busy machine may take longer), and serves again once the launcher has
    restarted it. The launcher is paused meanwhile (SIGSTOP), so that "while it is down" lasts
    long enough to see."""
    stack, launcher = own_stack, own_stack.proc.pid
    before = children(launcher)
    prompt = prompt_ids(tokenizer, "Name three rivers of Europe.")
    client = OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as pool:
        # A request in flight when the scheduler dies leaves sequences in the worker's batch:
        # the restarted scheduler's must not collide with them.
        in_flight = pool.submit(httpx.post, stack.base_url + "/completions", timeout=60, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 400, "ignore_eos": True})
        poll(lambda: stack.stats().num_requests_running == 1, 30)
        os.kill(launcher, signal.SIGSTOP)
        try:
            os.kill(before["scheduler"], signal.SIGKILL)
            _, took = poll(lambda: health_status(stack.root_url) == 503, 60)
            print(f"/health answered 503 {took:.1f} s after the scheduler was killed")
            failed = in_flight.result(timeout=60)
            assert failed.status_code == 503
            assert failed.json()["error"]["type"] == "service_unavailable_error"
            down = httpx.post(stack.base_url + "/completions", timeout=30,
                              json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert down.status_code == 503 and down.headers["retry-after"]
            assert down.json()["error"]["code"] == "scheduler_unavailable"
        finally:
            os.kill(launcher, signal.SIGCONT)
    scheduler = wait_for_child(launcher, "scheduler", not_pid=before["scheduler"])
    poll(lambda: health_status(stack.root_url) == 200, 120, interval=0.5)
    assert children(launcher) == {**before, "scheduler": scheduler}  # router and worker stayed
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(hf_reference.greedy(model_dir, prompt, 8),
                                                     skip_special_tokens=True)
    assert "scheduler exited with code -9; restarting scheduler" in stack.log()


def test_sigterm_lets_8_streams_finish_then_every_process_exits_0(own_stack, model_dir,
                                                                  tokenizer):
    stack, launcher = own_stack, own_stack.proc.pid
    client = OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=600)
    prompts = [prompt_ids(tokenizer, "Tell me about the sea."),
               prompt_ids(tokenizer, "Write a poem about bread.")]
    max_tokens = 40
    first_chunks = []

    def stream(i: int) -> tuple[str, str, int]:
        chunks = client.completions.create(
            model=MODEL, prompt=prompts[i % 2], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, reason, usage = "", None, None
        for chunk in chunks:
            first_chunks.append(i)
            for choice in chunk.choices:
                text += choice.text
                reason = choice.finish_reason or reason
            usage = chunk.usage or usage
        return text, reason, usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(8)]
        poll(lambda: set(first_chunks) == set(range(8)), 120, interval=0.02)
        assert not any(f.done() for f in futures)
        stack.proc.send_signal(signal.SIGTERM)
        # The router goes first: it refuses new connections while the streams go on.
        poll(lambda: health_status(stack.root_url) == 0, 60, interval=0.05)
        assert not all(f.done() for f in futures)
        results = [f.result(timeout=600) for f in futures]
    expected = [tokenizer.decode(hf_reference.greedy(model_dir, p, max_tokens, ignore_eos=True),
                                 skip_special_tokens=True) for p in prompts]
    for i, (text, reason, completion_tokens) in enumerate(results):
        assert (reason, completion_tokens) == ("length", max_tokens)
        assert text == expected[i % 2]
    # The launcher exits with 0 only when every child did; it says so for each, router first.
    assert stack.proc.wait(timeout=120) == 0
    log = stack.log()
    order = [log.index(f"pagedserve: {name} exited with code 0")
             for name in ("router", "scheduler", "worker 0")]
    assert order == sorted(order)
    assert not children(launcher)
