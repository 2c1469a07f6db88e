"""GenerateStream, the multiplexed call the router holds to the scheduler, through the real
processes (SmolLM2 on the CPU, public gRPC): several requests on one call get exactly the token ids
Generate gives (and transformers), one step's news for several requests travels in one message, an
abort on the call or the call's end frees the KV blocks, and a bad request's error reaches it alone."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference

PROMPTS = [[504, 3575, 282, 4649, 314], [1, 2, 3, 4, 5, 6, 7], [9707, 30, 1078], [100, 200, 300]]
MAX_TOKENS = 12


def greedy(request_id: str, prompt: list[int], max_tokens: int, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                              params=pb.SamplingParams(temperature=0, max_tokens=max_tokens, **params))


def long_request(request_id: str) -> pb.GenerateRequest:
    """A generation that would run for minutes on a CPU if nothing stopped it."""
    return greedy(request_id, list(range(100, 160)), 4000, ignore_eos=True)


class Call:
    """A GenerateStream call from a test's thread: requests go in from a queue, and `results`
    gathers each request's replies and its end (the string "finished" or its RequestError) as
    the call's messages come in (`messages` counts them)."""

    def __init__(self, stack, metadata=None):
        self.outgoing: queue.Queue = queue.Queue()
        self.call = stack.scheduler.GenerateStream(iter(self.outgoing.get, None), timeout=600,
                                                   metadata=metadata)
        self.replies: dict[str, list[pb.GenerateResponse]] = {}
        self.ends: dict[str, object] = {}
        self.messages: list[pb.GenerateStreamResponse] = []
        self.changed = threading.Condition()
        self.error: grpc.RpcError | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def generate(self, request: pb.GenerateRequest) -> None:
        self.outgoing.put(pb.GenerateStreamRequest(generate=request))

    def abort(self, request_id: str) -> None:
        self.outgoing.put(pb.GenerateStreamRequest(abort=pb.AbortRequest(request_id=request_id)))

    def half_close(self) -> None:
        self.outgoing.put(None)

    def tokens(self, request_id: str) -> list[int]:
        return [t for reply in self.replies.get(request_id, []) for t in reply.token_ids]

    def wait(self, done, timeout: float = 600) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: done() or self.error is not None, timeout), \
                "the call did not get there in time"

    def wait_ended(self, *request_ids: str) -> None:
        self.wait(lambda: all(r in self.ends for r in request_ids))

    def _read(self) -> None:
        try:
            for message in self.call:
                with self.changed:
                    self.messages.append(message)
                    for reply in message.responses:
                        self.replies.setdefault(reply.request_id, []).append(reply)
                    for error in message.errors:
                        self.ends[error.request_id] = error
                    for request_id in message.finished:
                        self.ends[request_id] = "finished"
                    self.changed.notify_all()
        except grpc.RpcError as err:
            with self.changed:
                self.error = err
                self.changed.notify_all()


@pytest.fixture()
def call(smol_stack):
    opened = Call(smol_stack)
    yield opened
    opened.call.cancel()


def test_requests_multiplexed_on_one_call_equal_generate_and_transformers(smol_stack, call,
                                                                          model_dir):
    for i, prompt in enumerate(PROMPTS):
        call.generate(greedy(f"mux-{i}", prompt, MAX_TOKENS))
    call.wait_ended(*(f"mux-{i}" for i in range(len(PROMPTS))))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = list(pool.map(lambda p: smol_stack.generate(p, MAX_TOKENS), PROMPTS))
    got = [call.tokens(f"mux-{i}") for i in range(len(PROMPTS))]
    assert got == expected
    assert got[0] == hf_reference.greedy(model_dir, PROMPTS[0], MAX_TOKENS)
    assert all(call.ends[f"mux-{i}"] == "finished" for i in range(len(PROMPTS)))
    for i in range(len(PROMPTS)):  # the same messages Generate sends: counts, a last reason
        last = call.replies[f"mux-{i}"][-1]
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert last.completion_tokens == len(got[i]) and last.prompt_tokens == len(PROMPTS[i])
    # The point of the call: one message carries one step's news of several requests.
    assert max(len({r.request_id for r in m.responses}) for m in call.messages) > 1


def test_n_sequences_and_logprobs_travel_as_on_generate(smol_stack, call):
    request = greedy("mux-n", PROMPTS[0], 4, n=2, seed=7, logprobs=2)
    request.params.temperature = 0.8
    call.generate(request)
    call.wait_ended("mux-n")
    plain = list(smol_stack.scheduler.Generate(
        pb.GenerateRequest(prompt_token_ids=PROMPTS[0], params=request.params), timeout=600))
    for index in (0, 1):
        mine = [r for r in call.replies["mux-n"] if r.index == index]
        theirs = [r for r in plain if r.index == index]
        assert [t for r in mine for t in r.token_ids] == [t for r in theirs for t in r.token_ids]
        assert [lp.token_id for r in mine for lp in r.logprobs] == \
            [t for r in theirs for t in r.token_ids]


def test_an_abort_on_the_call_frees_the_blocks_and_the_others_go_on(smol_stack, call):
    smol_stack.wait_idle()
    call.generate(long_request("mux-long"))
    call.wait(lambda: call.tokens("mux-long"))
    assert smol_stack.stats().kv_blocks_used > 0
    call.generate(greedy("mux-short", PROMPTS[1], 4))
    call.abort("mux-long")
    call.wait_ended("mux-long", "mux-short")
    assert call.ends["mux-long"] == "finished"
    assert call.replies["mux-long"][-1].finish_reason == pb.FINISH_REASON_ABORT
    assert len(call.tokens("mux-short")) == 4
    stats = smol_stack.wait_idle()
    assert stats.kv_blocks_used == 0 and stats.num_requests_running == 0
    call.abort("mux-long")  # ended already: ignored, nothing comes back
    call.generate(greedy("mux-after", PROMPTS[2], 2))  # the call goes on
    call.wait_ended("mux-after")
    assert len(call.tokens("mux-after")) == 2


def test_cancelling_the_call_aborts_its_requests(smol_stack):
    before = smol_stack.wait_idle()
    call = Call(smol_stack)
    for i in range(2):
        call.generate(long_request(f"mux-gone-{i}"))
    call.wait(lambda: call.tokens("mux-gone-0") and call.tokens("mux-gone-1"))
    assert smol_stack.stats().kv_blocks_used > 0
    call.call.cancel()  # the router went away
    after = smol_stack.wait_idle()
    assert after.kv_blocks_used == 0
    assert after.num_requests_running == after.num_requests_waiting == 0
    generated = after.generation_tokens_total - before.generation_tokens_total
    assert generated < 2 * 4000


def test_a_half_closed_call_ends_ok_after_its_requests(smol_stack):
    call = Call(smol_stack)
    call.generate(greedy("mux-last", PROMPTS[3], 3))
    call.half_close()
    call.reader.join(600)
    assert call.error is None and call.ends == {"mux-last": "finished"}
    assert call.call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("request_id, params, code, detail", [
    ("mux-bad", pb.SamplingParams(top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p: "),
    ("mux-bad", pb.SamplingParams(max_tokens=10 ** 6), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens: "),
    ("mux-bad", pb.SamplingParams(structured_outputs=pb.StructuredOutputParams(json="{")),
     grpc.StatusCode.INVALID_ARGUMENT, "structured_outputs: "),
    ("", pb.SamplingParams(max_tokens=2), grpc.StatusCode.INVALID_ARGUMENT, "request_id: "),
])
def test_a_bad_request_gets_its_error_on_the_call_and_the_others_go_on(smol_stack, call,
                                                                        request_id, params,
                                                                        code, detail):
    call.generate(greedy("mux-good-1", PROMPTS[0], 6))
    call.generate(pb.GenerateRequest(request_id=request_id, prompt_token_ids=[1, 2],
                                     params=params))
    call.generate(greedy("mux-good-2", PROMPTS[1], 6))
    call.wait_ended("mux-good-1", "mux-good-2", request_id)
    error = call.ends[request_id]
    assert error.code == code.value[0]
    assert error.message.startswith(detail)
    assert call.tokens(request_id) == []
    assert len(call.tokens("mux-good-1")) == len(call.tokens("mux-good-2")) == 6
    # The message is the one Generate ends with.
    if request_id:
        with pytest.raises(grpc.RpcError) as err:
            list(smol_stack.scheduler.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2],
                                                                  params=params), timeout=600))
        assert (err.value.code(), err.value.details()) == (code, error.message)


def test_a_request_id_in_flight_is_already_exists_and_leaves_the_first_alone(smol_stack, call):
    call.generate(long_request("mux-twin"))
    call.wait(lambda: call.tokens("mux-twin"))
    other = Call(smol_stack)  # on another call too
    try:
        for twin in (call, other):
            twin.generate(greedy("mux-twin", PROMPTS[0], 2))
        other.wait_ended("mux-twin")
        call.wait(lambda: "mux-twin" in call.ends)
        for twin in (call, other):
            error = twin.ends["mux-twin"]
            assert error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            assert error.message == "request_id: 'mux-twin' is already in flight"
        other.abort("mux-twin")  # not the other call's to stop: the first runs on
        seen = len(call.tokens("mux-twin"))
        call.wait(lambda: len(call.tokens("mux-twin")) > seen + 2)
        assert smol_stack.stats().num_requests_running == 1
        call.abort("mux-twin")
        assert smol_stack.wait_idle().kv_blocks_used == 0
    finally:
        other.call.cancel()
