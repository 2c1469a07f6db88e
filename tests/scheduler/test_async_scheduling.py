"""The engine's step loop with --async-scheduling (plan N+1 sent before result N is applied)
against the fake worker: what each client receives is what it receives without it, aborts and a
failed step end as they do without it, and nothing leaks."""
from __future__ import annotations

import asyncio

import pytest

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.scheduler.engine import Engine
from pagedserve.scheduler.outboxes import END_OF_REQUEST
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.workers import WorkerLost
from tests.helpers.fake_worker import FakeWorker, next_token

VOCAB, EOS, BLOCK_SIZE = 64, 0, 4


class FakeGroup:
    """WorkerGroup's send/receive over a FakeWorker, which runs each plan when it is sent (a
    worker runs plans in the order sent); `fail_at` makes that step's result an error."""

    def __init__(self, worker: FakeWorker, fail_at: int | None = None):
        self.worker = worker
        self.fail_at = fail_at
        self.results: asyncio.Queue = asyncio.Queue()
        self.most_in_flight = 0

    async def send(self, plan: wpb.StepPlan) -> None:
        result = self.worker.execute(wpb.StepPlan.FromString(plan.SerializeToString()))
        if plan.step_id == self.fail_at:
            result = wpb.StepResult(step_id=plan.step_id, error="RuntimeError: out of memory")
        self.results.put_nowait(result)
        self.most_in_flight = max(self.most_in_flight, self.results.qsize())

    async def receive(self) -> wpb.StepResult:
        await asyncio.sleep(0)  # the Generate handlers' turn, as while a real step runs
        return await self.results.get()


def engine_for(ahead: bool, num_blocks: int = 64, fail_at: int | None = None) -> Engine:
    config = SchedulerConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_model_len=256,
                             max_num_batched_tokens=32, async_scheduling=ahead)
    engine = Engine(Scheduler(config), FakeGroup(FakeWorker(num_blocks, BLOCK_SIZE, VOCAB), fail_at),
                    eos_token_ids=[EOS])
    engine.healthy = True
    return engine


REQUESTS = {  # request id: (prompt, max_tokens, n, stop_token_ids, ignore_eos)
    "long": (list(range(1, 23)), 20, 1, [], True),
    "eos": (next(p for p in ([i, j] for i in range(1, VOCAB) for j in range(1, VOCAB))
                 if next_token(p, VOCAB) == EOS), 9, 1, [], False),
    "n3": ([7, 8, 9], 6, 3, [], True),
    "stop": ([11, 12, 13, 14, 15], 30, 1, [next_token([11, 12, 13, 14, 15, 16], VOCAB)], False),
    "short": ([3, 1, 4, 1, 5], 1, 1, [], True),
}


async def serve(engine: Engine, abort_after_first: str | None = None) -> dict:
    """Every request of REQUESTS through engine's step loop: each one's replies, as the client
    gets them, as (index, token_ids, finish_reason) triples, or the error it ended with."""
    queues = {}
    for rid, (prompt, max_tokens, n, stop, ignore_eos) in REQUESTS.items():
        params = pb.SamplingParams(max_tokens=max_tokens, n=n, temperature=0, ignore_eos=ignore_eos,
                                   stop_token_ids=stop)
        queues[rid] = engine.add(rid, prompt, params)
    loop = asyncio.ensure_future(engine.serve_steps())
    got = {}

    async def collect(rid):
        replies = []
        while (item := await queues[rid].get()) is not END_OF_REQUEST:
            if isinstance(item, Exception):
                return item
            replies.append((item.index, list(item.token_ids), item.finish_reason))
            if rid == abort_after_first and len(replies) == 1:
                engine.abort(rid)
        return replies
    try:
        done = asyncio.gather(*(collect(rid) for rid in queues))
        finished, _ = await asyncio.wait([done, loop], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if loop in finished:  # the loop ended: a failed step
            engine.fail_all(loop.exception())
        got = dict(zip(queues, await asyncio.wait_for(done, 60)))
    finally:
        loop.cancel()
    return got


def tokens_by_index(replies) -> dict:
    out = {}
    for index, tokens, reason in replies:
        out.setdefault(index, []).extend(tokens)
    return out


@pytest.mark.parametrize("num_blocks", [64, 12], ids=["roomy", "preempting"])
def test_every_client_gets_what_it_gets_without_async_scheduling(num_blocks):
    sync, ahead = engine_for(False, num_blocks), engine_for(True, num_blocks)
    expected, got = asyncio.run(serve(sync)), asyncio.run(serve(ahead))
    assert {rid: tokens_by_index(r) for rid, r in got.items()} == \
        {rid: tokens_by_index(r) for rid, r in expected.items()}
    finish = {rid: sorted((i, reason) for i, _, reason in r if reason) for rid, r in got.items()}
    assert finish["eos"] == [(0, pb.FINISH_REASON_STOP)] and finish["stop"] == [(0, pb.FINISH_REASON_STOP)]
    assert finish["long"] == [(0, pb.FINISH_REASON_LENGTH)] and len(finish["n3"]) == 3
    assert ahead.workers.most_in_flight == 2, "no plan was sent ahead of a result"
    if num_blocks == 12:
        assert ahead.scheduler.num_preemptions > 0
    for engine in (sync, ahead):
        assert engine.scheduler.kv.num_used_blocks == 0 and not engine.scheduler.requests
        assert not engine.outboxes


def test_an_abort_while_a_plan_is_ahead_frees_everything():
    engine = engine_for(True)
    got = asyncio.run(serve(engine, abort_after_first="long"))
    assert got["long"][-1][2] == pb.FINISH_REASON_ABORT
    assert sum(len(t) for _, t, _ in got["long"]) < REQUESTS["long"][1]
    assert tokens_by_index(got["short"]) == tokens_by_index(asyncio.run(serve(engine_for(False)))["short"])
    assert engine.scheduler.kv.num_used_blocks == 0 and not engine.scheduler.requests


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_a_failed_step_fails_every_request_in_flight(ahead):
    engine = engine_for(ahead, fail_at=3)
    got = asyncio.run(serve(engine))
    failed = {rid for rid, r in got.items() if not isinstance(r, list)}
    assert failed and all(isinstance(got[rid], WorkerLost) and "out of memory" in str(got[rid])
                          for rid in failed), got
    for rid in got.keys() - failed:  # finished before the failed step: every sequence to its end
        assert len({i for i, _, reason in got[rid] if reason}) == REQUESTS[rid][2]
    assert engine.scheduler.kv.num_used_blocks == 0 and not engine.scheduler.in_flight
