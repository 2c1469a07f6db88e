"""A scheduler that goes away mid-stream: the router re-sends the request as a continuation
(resume_output_token_ids) to a healthy replica, and the client's stream goes on without an
error, a repeated token or a gap; against fake schedulers (tests/helpers/fake_scheduler.py)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.helpers.fake_scheduler import FakeScheduler, FakeSchedulerServer
from tests.helpers.router_fixtures import EOS, Harness, eventually
from tests.helpers.sse_client import stream_completion

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def setup(model_dir, tokenizer):
    h = Harness(str(model_dir), tokenizer.get_vocab_size(), [EOS])
    other = FakeScheduler(vocab_size=tokenizer.get_vocab_size(), eos_token_ids=[EOS],
                          model_path=str(model_dir), served_model_name="smol")
    second = FakeSchedulerServer(other)
    h.loop.run(second.start())
    servers = (h.scheduler, second)
    pair = h.router(scheduler_addrs=f"{servers[0].address},{servers[1].address}",
                    routing_policy="round_robin", health_interval_s=0.1)
    one = h.router(health_interval_s=0.1)  # the first scheduler alone
    short = h.router(health_interval_s=0.1, resume_timeout=1.0)
    yield h, (h.fake, other), servers, pair, one, short
    h.loop.run(second.stop())
    h.close()


@pytest.fixture
def fakes(setup):
    h, fakes, servers, *routers = setup
    for fake, server in zip(fakes, servers):
        fake.reset()
        if server._server is None:
            h.loop.run(server.start())
    for router in routers:
        eventually(lambda: httpx.get(router.url + "/health").status_code == 200)
    return fakes


BODY = {"model": "smol", "prompt": "once upon a time", "max_tokens": MAX_TOKENS,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def stream(url: str, on_chunk=None):
    """The streamed text, the usage's completion_tokens, and the errors seen."""
    got = stream_completion(url, BODY, on_chunk, timeout=60)
    return got.text, got.completion_tokens, got.errors


def kill_after(n: int, stop):
    """An on_chunk callback that calls stop() once, after the n-th chunk."""
    def on_chunk(chunks: int):
        if chunks == n:
            threading.Thread(target=stop).start()
    return on_chunk


def test_a_stream_whose_scheduler_goes_away_goes_on_at_the_other_replica(setup, fakes):
    h, _, servers, pair, *_ = setup
    expected = stream(pair.url)
    assert expected[1] == MAX_TOKENS and not expected[2]
    for fake in fakes:
        fake.reset()
        fake.token_delay_s = 0.03
    carrier = []

    def stop():
        carrier.append(next(i for i, f in enumerate(fakes) if f.requests))
        h.loop.run(servers[carrier[0]].stop())
    got = stream(pair.url, kill_after(8, stop))
    assert got == expected  # the same text, usage, and no error
    survivor = fakes[1 - carrier[0]]
    continuation = survivor.requests[-1]
    resumed = len(continuation.resume_output_token_ids)
    assert 8 <= resumed < MAX_TOKENS  # the tokens the client had: at least the 8 it had seen
    assert continuation.request_id.endswith("-resume1")
    assert continuation.prompt_token_ids == fakes[carrier[0]].requests[-1].prompt_token_ids
    metrics = httpx.get(pair.url + "/metrics").text
    assert "pagedserve_router_request_resumptions_total 1.0" in metrics


def test_with_one_replica_the_stream_waits_for_the_restarted_scheduler(setup, fakes):
    h, _, servers, _, one, _ = setup
    expected = stream(one.url)
    fakes[0].reset()
    fakes[0].token_delay_s = 0.03

    def restart():
        h.loop.run(servers[0].stop())
        time.sleep(1.0)
        h.loop.run(servers[0].start())
    got = stream(one.url, kill_after(5, restart))
    assert got == expected
    assert len(fakes[0].requests[-1].resume_output_token_ids) >= 5


def test_a_stream_not_resumed_within_the_resume_timeout_fails_as_before(setup, fakes):
    h, _, servers, _, _, short = setup
    fakes[0].token_delay_s = 0.03
    started = time.monotonic()
    text, _, errors = stream(short.url, kill_after(3, lambda: h.loop.run(servers[0].stop())))
    assert errors and "scheduler" in errors[0]
    assert 1.0 <= time.monotonic() - started < 20
    assert text  # what came before the break was streamed
