"""A lost worker, resumed (Engine.run, Scheduler.suspend_all): the requests in flight are held and
recomputed once a fresh worker is back, and each client gets exactly what an undisturbed run gives
(no error, no repeated token, no gap); a request whose workers are not back within
--resume-timeout fails as it did before resuming existed; nothing leaks. Against the fake worker,
which checks at every step that each sequence reads only its own tokens' KV."""
from __future__ import annotations

import asyncio

import pytest

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.scheduler.engine import MAX_LOSSES, Engine
from pagedserve.scheduler.outboxes import END_OF_REQUEST
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.workers import WorkerLost
from tests.helpers.fake_worker import FakeWorker

VOCAB, EOS, BLOCK_SIZE, NUM_BLOCKS = 64, 0, 4, 64


class DyingGroup:
    """WorkerGroup over a FakeWorker that dies at the steps in `die_at` (its Execute stream
    breaks: WorkerLost) and is replaced by a fresh one (empty batch, zeroed cache) once `back` is
    set, as the launcher or an orchestrator restarts a worker."""

    def __init__(self, die_at: set[int]):
        self.die_at = die_at
        self.worker = None
        self.results: asyncio.Queue = asyncio.Queue()
        self.back = asyncio.Event()
        self.back.set()
        self.addresses = ["fake:0"]
        self.num_starts = 0

    async def wait_ready(self):
        await self.back.wait()
        return [wpb.WorkerInfo(num_kv_blocks=NUM_BLOCKS)]

    def open(self) -> None:
        self.worker = FakeWorker(NUM_BLOCKS, BLOCK_SIZE, VOCAB)
        self.results = asyncio.Queue()
        self.num_starts += 1

    def cancel(self) -> None:
        self.worker = None

    async def send(self, plan: wpb.StepPlan) -> None:
        if self.worker is None:
            raise WorkerLost("a worker's Execute stream has ended")
        if plan.step_id in self.die_at:
            self.worker = None
            self.die_at.discard(plan.step_id)
            self.back.clear()
            self.results.put_nowait(None)
            return
        self.results.put_nowait(self.worker.execute(wpb.StepPlan.FromString(plan.SerializeToString())))

    async def receive(self) -> wpb.StepResult:
        await asyncio.sleep(0)
        result = await self.results.get()
        if result is None:
            raise WorkerLost("worker fake:0 failed: UNAVAILABLE: Socket closed")
        return result


REQUESTS = {  # request id: (prompt, max_tokens, n, seed)
    "greedy": (list(range(1, 23)), 20, 1, None),
    "n3": ([7, 8, 9], 12, 3, None),
    "seeded": ([5, 6, 7, 8, 9, 10], 16, 1, 1234),
    "short": ([3, 1, 4, 1, 5], 3, 1, None),
}


def engine_for(die_at: set[int], ahead: bool = False, resume_timeout: float = 60.0) -> Engine:
    config = SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_model_len=256,
                             max_num_batched_tokens=32, async_scheduling=ahead)
    return Engine(Scheduler(config), DyingGroup(die_at), eos_token_ids=[EOS],
                  resume_timeout=resume_timeout)


async def serve(engine: Engine, while_lost=None) -> dict:
    """Every request of REQUESTS through Engine.run: per request, its tokens by sequence index as
    the client got them (and whether each ended), or the error it ended with. `while_lost` runs
    once the first worker is lost, before a new one is let back."""
    runner = asyncio.ensure_future(engine.run())
    await asyncio.sleep(0)  # connect
    queues = {}
    for rid, (prompt, max_tokens, n, seed) in REQUESTS.items():
        params = pb.SamplingParams(max_tokens=max_tokens, n=n, temperature=0, ignore_eos=True)
        if seed is not None:
            params.temperature, params.seed = 1.0, seed
        queues[rid] = engine.add(rid, prompt, params)

    async def collect(rid):
        tokens, ended = {}, set()
        while (item := await queues[rid].get()) is not END_OF_REQUEST:
            if isinstance(item, Exception):
                return item
            tokens.setdefault(item.index, []).extend(item.token_ids)
            if item.finish_reason:
                ended.add(item.index)
        return tokens, ended

    async def lose_then_return():  # each time a worker is lost
        group = engine.workers
        while True:
            while group.back.is_set() or engine.healthy:  # until the engine knows
                await asyncio.sleep(0)
            if while_lost is not None and group.num_starts == 1:
                await while_lost(engine)
            group.back.set()
            while not engine.healthy:
                await asyncio.sleep(0)

    helper = asyncio.ensure_future(lose_then_return())
    clients = asyncio.gather(*(collect(rid) for rid in queues))
    try:
        await asyncio.wait([clients, helper], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if helper.done() and helper.exception():
            raise helper.exception()
        return dict(zip(queues, await asyncio.wait_for(clients, 30)))
    finally:
        runner.cancel()
        helper.cancel()


def undisturbed(ahead: bool) -> dict:
    return asyncio.run(serve(engine_for(set(), ahead)))


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
@pytest.mark.parametrize("die_at", [{1}, {4}, {4, 9}], ids=["in-prefill", "in-decode", "twice"])
def test_a_lost_worker_is_resumed_and_every_client_gets_the_undisturbed_output(ahead, die_at):
    engine = engine_for(set(die_at), ahead)

    async def check_held(engine):  # while no worker serves: held, holding no block
        s = engine.scheduler
        assert not s.running and len(s.requests) >= 1 and s.kv.num_used_blocks == 0
        assert not engine.outboxes.keys() - s.requests.keys()
    got = asyncio.run(serve(engine, check_held))
    assert got == undisturbed(ahead)
    for rid, (tokens, ended) in got.items():
        assert ended == set(range(REQUESTS[rid][2])) and all(
            len(t) == REQUESTS[rid][1] for t in tokens.values())
    s = engine.scheduler
    assert engine.workers.num_starts == 1 + len(die_at)
    assert s.num_requests_resumed >= len(die_at)  # each loss held at least one request
    assert engine.stats().num_requests_resumed == s.num_requests_resumed
    assert s.kv.num_used_blocks == 0 and s.kv.pool.num_free == NUM_BLOCKS
    assert not s.requests and not engine.outboxes and not engine.held


def test_requests_whose_workers_are_not_back_within_the_resume_timeout_fail_and_leak_nothing():
    engine = engine_for({4}, resume_timeout=0.2)

    async def stay_away(engine):
        await asyncio.sleep(0.5)
        s = engine.scheduler
        assert not s.requests and not engine.outboxes  # failed at 0.2 s, before the worker's back
    got = asyncio.run(serve(engine, stay_away))
    failed = [rid for rid, r in got.items() if isinstance(r, Exception)]
    assert failed and all(isinstance(got[rid], WorkerLost) and "--resume-timeout" in str(got[rid])
                          for rid in failed)
    s = engine.scheduler
    assert s.num_requests_resumed == 0
    assert s.kv.num_used_blocks == 0 and not s.requests and not engine.held


def test_a_request_held_through_max_losses_lost_workers_in_a_row_fails():
    engine = engine_for(set(range(1, 1 + MAX_LOSSES)))  # each step, before any token comes back
    got = asyncio.run(serve(engine))
    assert all(isinstance(r, WorkerLost) and f"{MAX_LOSSES} times" in str(r) for r in got.values())
    assert engine.scheduler.kv.num_used_blocks == 0 and not engine.scheduler.requests


def test_an_abort_while_the_worker_is_lost_ends_the_held_request():
    engine = engine_for({4})

    async def abort_one(engine):
        assert engine.abort("greedy")
    got = asyncio.run(serve(engine, abort_one))
    tokens, ended = got["greedy"]
    assert ended == {0} and len(tokens[0]) < REQUESTS["greedy"][1]  # ended by the abort
    expected = undisturbed(False)
    assert {rid: got[rid] for rid in got if rid != "greedy"} == \
        {rid: expected[rid] for rid in expected if rid != "greedy"}
    assert engine.scheduler.kv.num_used_blocks == 0 and not engine.scheduler.requests
