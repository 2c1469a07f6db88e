"""Drives the scheduler's policy (scheduler/scheduler.py) against the fake worker, step by step, as
the engine does (tests/scheduler/): no torch, no processes, and the block pool's invariants checked
after every step."""
from __future__ import annotations

from collections import Counter

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.config import default_max_num_batched_tokens
from pagedserve.scheduler.request import SamplingLimits
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.helpers.fake_worker import FakeWorker

VOCAB = 64
EOS = 0


def make(num_blocks=64, block_size=4, max_model_len=256, **kw):
    kw.setdefault("max_num_batched_tokens", default_max_num_batched_tokens("cpu"))
    config = SchedulerConfig(num_blocks=num_blocks, block_size=block_size,
                             max_model_len=max_model_len, **kw)
    return Scheduler(config), FakeWorker(num_blocks, block_size, VOCAB)


def add(s: Scheduler, rid: str, prompt, max_tokens=8, n=1, ignore_eos=False):
    params = pb.SamplingParams(max_tokens=max_tokens, n=n, temperature=0, ignore_eos=ignore_eos)
    limits = SamplingLimits(max_tokens, 0, frozenset(), frozenset({EOS}), ignore_eos)
    return s.add_request(rid, prompt, params, limits)


def step(s: Scheduler, w: FakeWorker):
    """One plan built and one result applied. With async scheduling, as the engine does it: the
    next plan is built and sent before the result of the one before it is applied (the fake worker
    runs each plan when it is sent, as a real one runs them in the order sent); the plan returned
    is the one whose result was applied."""
    if not s.config.async_scheduling:
        plan = s.schedule()
        news = s.update(w.execute(plan))
        check_invariants(s)
        return plan, news
    sent = w.sent
    while len(sent) < 2 and s.has_work():
        plan = s.schedule()
        if not (plan.scheduled or plan.freed_seq_ids):
            break
        sent.append((plan, w.execute(plan)))
    plan, result = sent.popleft()
    news = s.update(result)
    check_invariants(s)
    return plan, news


def drain(s, w, limit=10_000):
    for _ in range(limit):
        if not s.has_work() and not w.sent:
            return
        step(s, w)
    raise AssertionError("the scheduler did not finish its work")


def check_invariants(s: Scheduler) -> None:
    pool = s.kv.pool
    owners = Counter(b for seq in s.running for b in s.kv.block_table(seq))
    for seq in s.waiting:
        assert not s.kv.block_table(seq), "a waiting sequence holds blocks"
    for b in range(pool.num_blocks):
        assert pool.ref_counts[b] == owners[b], f"block {b}: ref count != owners"
        assert (b in pool.free) == (owners[b] == 0)
        if owners[b] > 1:
            assert pool.hash_of[b] is not None, f"block {b} shared without being a cached prefix"
    for h, b in pool.cached.items():
        assert pool.hash_of[b] == h
