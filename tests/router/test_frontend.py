"""The front end of the scheduler (router/frontend.py) on its own, as the offline LLM uses it: no
HTTP, a fake scheduler over real gRPC, the request parser, the runs' choices, and what each run
reports to the RequestMetrics it was given."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pagedserve.router.errors import APIError
from pagedserve.router.frontend import Frontend
from pagedserve.router.protocol import parse_chat, parse_completion
from pagedserve.router.request_metrics import RequestMetrics
from pagedserve.router.run import deltas
from pagedserve.router.settings import Settings


class RecordedMetrics(RequestMetrics):
    """Every report, in order: ("started",), ("first",), ("inter",), ("finished", reasons)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def request_started(self) -> None:
        self.calls.append(("started",))

    def first_token(self, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append(("first",))

    def inter_token(self, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append(("inter",))

    def request_finished(self, seconds: float, finish_reasons) -> None:
        assert seconds >= 0
        self.calls.append(("finished", list(finish_reasons)))


def serve(harness, parse, body: dict, request_id: str, before_close=lambda: True):
    """One request through a front end of its own: the parsed request, the finished run and the
    metrics it reported. The front end closes (which cancels its call) once before_close() holds."""
    metrics = RecordedMetrics()

    async def go():
        frontend = await Frontend.connect(Settings(scheduler_addr=harness.scheduler.address),
                                          metrics, wait=False)
        try:
            req = parse(body, frontend.model)
            run = await frontend.start(req, [f"{request_id}-{i}" for i in range(len(req.prompts))],
                                       time.perf_counter())
            try:
                async for _ in deltas(run, await run.first()):
                    pass
            finally:
                run.close()
            deadline = time.monotonic() + 10
            while not before_close() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return req, run
        finally:
            await frontend.close()

    req, run = harness.loop.run(go())
    return req, run, metrics


def test_a_completion_is_served_without_http(harness, fake, tokenizer):
    ids = tokenizer.encode(" one two three four five six", add_special_tokens=False).ids
    fake.script = lambda prompt, params, index: ids
    req, run, metrics = serve(harness, parse_completion, {"prompt": "Count", "max_tokens": 4},
                              "offline-count")
    [choice] = run.choices
    assert choice.token_ids == ids[:4] and choice.text == tokenizer.decode(ids[:4])
    assert choice.finish_reason == "length"
    assert [r.request_id for r in fake.requests] == ["offline-count-0"]
    assert list(fake.requests[0].prompt_token_ids) == req.prompts[0].token_ids
    # one token a message: a first token, then an inter-token latency for each later output
    assert metrics.calls == [("started",), ("first",), *[("inter",)] * 3, ("finished", ["length"])]


def test_a_chat_with_n_choices_and_a_stop_string(harness, fake, tokenizer):
    ids = tokenizer.encode("Red. Blue.", add_special_tokens=False).ids
    fake.script = lambda prompt, params, index: ids
    body = {"messages": [{"role": "user", "content": "A color?"}], "n": 2, "stop": ["."],
            "max_tokens": 20}
    _, run, metrics = serve(harness, parse_chat, body, "offline-chat",
                            before_close=lambda: fake.aborts)
    assert [c.text for c in run.choices] == ["Red", "Red"]
    assert [c.stop_reason for c in run.choices] == [".", "."]
    assert fake.aborts == ["offline-chat-0"]  # the stop string ended it: the scheduler was told
    assert metrics.calls[-1] == ("finished", ["stop", "stop"])


def test_bad_input_and_scheduler_errors_are_api_errors(harness, fake):
    with pytest.raises(APIError) as bad:
        serve(harness, parse_completion, {"prompt": "x", "temperature": 9}, "offline-bad")
    assert (bad.value.status, bad.value.param) == (400, "temperature")
    fake.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    with pytest.raises(APIError) as full:
        serve(harness, parse_completion, {"prompt": "x"}, "offline-full")
    assert (full.value.status, full.value.code) == (503, "server_overloaded")
    assert "queue full" in full.value.message
