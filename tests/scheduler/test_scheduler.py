"""The scheduler's policy against a fake worker: no torch, no processes, milliseconds per case."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.request import SamplingLimits, Status
from pagedserve.scheduler.scheduler import QueueFull
from tests.helpers.scheduler_driver import EOS, VOCAB, add, drain, make, step

def alone(prompt, max_tokens, n=1, ignore_eos=True):
    s, w = make(num_blocks=512)
    request = add(s, "alone", prompt, max_tokens, n, ignore_eos)
    drain(s, w)
    return [seq.output_ids() for seq in request.sequences]


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_one_request_runs_to_max_tokens_then_frees_everything(ahead):
    s, w = make(async_scheduling=ahead)
    request = add(s, "a", [5, 6, 7, 8, 9], max_tokens=6, ignore_eos=True)
    drain(s, w)
    seq = request.sequences[0]
    assert seq.num_output == 6 and seq.finish_reason == pb.FINISH_REASON_LENGTH
    assert s.kv.num_used_blocks == 0 and not s.running and not s.requests


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_eos_finishes_with_stop(ahead):
    s, w = make(async_scheduling=ahead)
    request = add(s, "a", eos_prompt(), max_tokens=5)
    drain(s, w)
    assert request.sequences[0].finish_reason == pb.FINISH_REASON_STOP
    assert request.sequences[0].output_ids() == [EOS]


def eos_prompt() -> list[int]:
    """A prompt whose first sampled token is EOS under the fake model."""
    from tests.helpers.fake_worker import next_token
    return next(p for p in ([i, j] for i in range(1, VOCAB) for j in range(1, VOCAB))
                if next_token(p, VOCAB) == EOS)


def test_async_scheduling_throws_away_the_token_computed_after_a_stop():
    s, w = make(async_scheduling=True)
    request = add(s, "a", eos_prompt(), max_tokens=5)
    plans = []
    while s.has_work() or w.sent:
        plans.append(step(s, w)[0])
    seq = request.sequences[0]
    assert seq.output_ids() == [EOS] and seq.finish_reason == pb.FINISH_REASON_STOP
    # Plan 1 ran the sequence on before its first token was known; that token ended it, so what
    # plan 1 sampled is not the client's, and plan 2 frees the sequence on the worker.
    assert [[sc.seq_id for sc in p.scheduled] for p in plans] == [[0], [0], []]
    assert list(plans[2].freed_seq_ids) == [0] and not w.seqs
    assert s.generation_tokens_total == 1 and s.kv.num_used_blocks == 0


def test_async_scheduling_does_not_run_ahead_of_a_certain_end():
    s, w = make(async_scheduling=True)
    prompt = [5, 6, 7, 8, 9]
    request = add(s, "a", prompt, max_tokens=3, ignore_eos=True)
    computed = 0
    while s.has_work() or w.sent:
        computed += sum(sc.num_tokens for sc in step(s, w)[0].scheduled)
    assert request.sequences[0].output_ids() == alone(prompt, 3)[0]
    assert computed == len(prompt) + 2, "a token was computed after max_tokens"


def test_async_scheduling_does_not_run_a_structured_output_ahead_of_its_token():
    """Its grammar must not be asked for a token after the one that ends it."""
    s, w = make(async_scheduling=True)
    params = pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                               structured_outputs=pb.StructuredOutputParams(regex="[a-z]+"))
    constrained = s.add_request("regex", [5, 6, 7], params,
                                SamplingLimits(4, 0, frozenset(), frozenset({EOS}), True))
    free = add(s, "free", [8, 9, 10], max_tokens=4, ignore_eos=True)
    scheduled = []
    while s.has_work() or w.sent:
        scheduled.append(sorted(sc.seq_id for sc in step(s, w)[0].scheduled))
    # The free sequence (1) runs every step; the constrained one (0) only once its token is in.
    assert scheduled[:4] == [[0, 1], [1], [0, 1], [1]]
    assert constrained.sequences[0].output_ids() == alone([5, 6, 7], 4)[0]
    assert free.sequences[0].output_ids() == alone([8, 9, 10], 4)[0]
    assert not w.seqs and s.kv.num_used_blocks == 0


def test_chunked_prefill_keeps_decodes_going():
    s, w = make(num_blocks=128, max_num_batched_tokens=8)
    add(s, "short", [1, 2, 3], max_tokens=30, ignore_eos=True)
    step(s, w)  # the short one is decoding now
    add(s, "long", list(range(1, 41)), max_tokens=2, ignore_eos=True)
    for _ in range(5):
        plan, _ = step(s, w)
        ids = {sc.seq_id: sc.num_tokens for sc in plan.scheduled}
        assert ids[0] == 1, "the decode was not scheduled beside the prefill chunk"
        assert sum(ids.values()) <= 8
    drain(s, w)
    assert s.kv.num_used_blocks == 0


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_prefix_cache_hits_for_a_shared_prompt(ahead):
    s, w = make(num_blocks=64, block_size=4, async_scheduling=ahead)
    system = list(range(1, 21))  # 5 full blocks
    add(s, "first", system + [30, 31], max_tokens=2, ignore_eos=True)
    drain(s, w)
    before = s.kv.hits
    req = add(s, "second", system + [40, 41, 42], max_tokens=2, ignore_eos=True)
    plan, _ = step(s, w)
    assert plan.new_sequences[0].num_computed_tokens == 20
    assert s.kv.hits - before == 20
    assert req.sequences[0].num_cached_tokens == 20
    drain(s, w)
    assert req.sequences[0].output_ids() == alone(system + [40, 41, 42], 2)[0]


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_preemption_when_blocks_run_out_gives_the_same_output(ahead):
    s, w = make(num_blocks=12, block_size=4, async_scheduling=ahead)
    prompts = {f"r{i}": [i + 1] * (5 + i) for i in range(6)}
    requests = {rid: add(s, rid, p, max_tokens=12, ignore_eos=True) for rid, p in prompts.items()}
    kept = 0  # tokens of sequences preempted by a plan built while their step ran
    while s.has_work() or w.sent:
        _, news = step(s, w)
        kept += sum(seq.status is Status.WAITING for seq in news)
    assert s.num_preemptions > 0
    if ahead:
        assert kept > 0, "no sequence was preempted while its step ran"
    for rid, request in requests.items():
        assert request.sequences[0].output_ids() == alone(prompts[rid], 12)[0]
    assert s.kv.num_used_blocks == 0
    # Every token computed was sampled once: none lost to a preemption, none counted twice.
    assert s.generation_tokens_total == 12 * len(prompts)


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_a_sibling_preempted_while_its_step_runs_is_not_readmitted_before_its_token(ahead):
    """The sibling is preempted by a plan built while its step runs. Re-added in that same plan,
    it would sample that step's token a second time, and the block holding the duplicate would
    enter the prefix cache under tokens the worker never wrote."""
    s, w = make(num_blocks=9, max_num_batched_tokens=16, enable_prefix_caching=True,
                async_scheduling=ahead)
    prompt = list(range(1, 13)) + [1] * 12
    request = add(s, "r", prompt, max_tokens=8, n=2)
    drain(s, w)
    assert s.num_preemptions > 0
    expected = alone(prompt, 8, 2, ignore_eos=False)
    assert [seq.output_ids() for seq in request.sequences] == expected
    assert s.kv.num_used_blocks == 0 and not w.seqs


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_parallel_sampling_computes_the_prompt_once(ahead):
    s, w = make(num_blocks=64, block_size=4, async_scheduling=ahead)
    prompt = list(range(1, 14))  # 3 full blocks + 1 token
    request = add(s, "n", prompt, max_tokens=3, n=3, ignore_eos=True)
    computed = 0
    while s.has_work() or w.sent:
        plan, _ = step(s, w)
        computed += sum(sc.num_tokens for sc in plan.scheduled)
    # 13 prompt tokens once, then 1 recomputed token per sibling, then 2 decodes per sequence.
    assert computed == 13 + 2 * 1 + 3 * 2
    outs = [seq.output_ids() for seq in request.sequences]
    assert outs == [outs[0]] * 3


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_seeded_siblings_get_distinct_reproducible_seeds(ahead):
    s, w = make(async_scheduling=ahead)
    params = pb.SamplingParams(max_tokens=2, n=3, temperature=1.0, seed=7)
    s.add_request("seeded", [1, 2, 3], params, SamplingLimits(2, 0, frozenset(), frozenset({EOS}), True))
    seeds = {}
    while s.has_work() or w.sent:
        plan, _ = step(s, w)
        seeds.update({new.seq_id: new.params.seed for new in plan.new_sequences})
    assert sorted(seeds.values()) == [7, 8, 9]
    assert params.seed == 7, "the request's own parameters are left as they were"


def test_abort_frees_blocks_and_tells_the_worker():
    s, w = make()
    add(s, "a", list(range(1, 30)), max_tokens=50, ignore_eos=True)
    step(s, w)
    assert s.kv.num_used_blocks > 0
    s.abort("a")
    assert s.kv.num_used_blocks == 0
    plan, _ = step(s, w)
    assert list(plan.freed_seq_ids) == [0] and not w.seqs


def test_waiting_queue_limit():
    s, _ = make(max_waiting_requests=2)
    add(s, "a", [1])
    add(s, "b", [1])
    with pytest.raises(QueueFull):
        add(s, "c", [1])


# ----- property test --------------------------------------------------------------------------

prefixes = [list(range(1, 13)), list(range(20, 29)), []]
requests = st.tuples(st.sampled_from(range(len(prefixes))),
                     st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=12),
                     st.integers(1, 10), st.integers(1, 3))
ops = st.lists(st.one_of(st.tuples(st.just("add"), requests),
                         st.tuples(st.just("abort"), st.integers(0, 50)),
                         st.tuples(st.just("step"), st.integers(1, 3))), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(8, 40), budget=st.sampled_from([4, 16, 64]),
       caching=st.booleans(), ahead=st.booleans())
def test_random_streams_never_leak_or_share_blocks_wrongly(ops, num_blocks, budget, caching, ahead):
    """Random adds, aborts and steps, with and without async scheduling: the outputs are those of
    each request run alone (synchronously), and nothing leaks."""
    s, w = make(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget,
                enable_prefix_caching=caching, async_scheduling=ahead)
    added, aborted = {}, set()
    for op, arg in ops:
        if op == "add":
            prefix, suffix, max_tokens, n = arg
            prompt = prefixes[prefix] + suffix
            if -(-(len(prompt) + max_tokens) // 4) > num_blocks:
                continue  # the service refuses what can never fit
            rid = f"r{len(added)}"
            added[rid] = (add(s, rid, prompt, max_tokens, n), prompt, max_tokens, n)
        elif op == "abort" and added:
            rid = f"r{arg % len(added)}"
            s.abort(rid)
            aborted.add(rid)
        else:
            for _ in range(arg):
                if s.has_work() or w.sent:
                    step(s, w)
    drain(s, w)
    assert s.kv.num_used_blocks == 0 and not s.running and not s.waiting and not s.requests
    assert all(s.kv.pool.ref_counts[b] == 0 for b in range(num_blocks))
    assert not w.seqs, "the worker still holds sequences the scheduler forgot"
    for rid, (request, prompt, max_tokens, n) in added.items():
        if rid in aborted:
            continue
        assert all(seq.status is Status.FINISHED for seq in request.sequences)
        assert [seq.output_ids() for seq in request.sequences] == alone(prompt, max_tokens, n, ignore_eos=False)


def test_engine_streams_every_sibling_to_the_end_when_they_finish_together():
    from pagedserve.scheduler.engine import Engine
    from pagedserve.scheduler.outboxes import END_OF_REQUEST
    s, w = make()
    engine = Engine(s, workers=None, eos_token_ids=[EOS])
    params = pb.SamplingParams(max_tokens=3, n=3, temperature=0, ignore_eos=True)
    queue = engine.add("together", [5, 6, 7], params)
    while s.has_work():
        plan = s.schedule()
        engine.publish(s.update(w.execute(plan)))
    tokens = Counter()
    while (item := queue.get_nowait()) is not END_OF_REQUEST:
        tokens[item.index] += len(item.token_ids)
    assert tokens == {0: 3, 1: 3, 2: 3}
