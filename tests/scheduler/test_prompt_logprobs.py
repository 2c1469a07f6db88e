"""The scheduler's side of prompt logprobs, against the fake worker: every prompt position once, in
order, on the stream's first message, whatever chunking, prefix cache hits, preemption or n do."""
from __future__ import annotations

from collections import Counter

import pytest

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.engine import Engine
from pagedserve.scheduler.outboxes import END_OF_REQUEST
from pagedserve.scheduler.validation import InvalidRequest, check_sampling
from tests.helpers.fake_worker import prompt_logprob
from tests.helpers.scheduler_driver import EOS, make, step


def start(engine: Engine, rid: str, prompt: list[int], max_tokens=3, n=1, k=2):
    params = pb.SamplingParams(max_tokens=max_tokens, n=n, temperature=0, ignore_eos=True,
                               num_prompt_logprobs=k)
    return engine.add(rid, prompt, params)


def run(engine: Engine, plans: list | None = None) -> None:
    """Steps until nothing is left (with async scheduling, as the engine runs them: see step)."""
    s, w = engine.scheduler, engine.workers
    while s.has_work() or w.sent:
        plan, news = step(s, w)
        if plans is not None:
            plans.append(plan)
        engine.publish(news)


def messages(queue) -> list[pb.GenerateResponse]:
    out = []
    while (item := queue.get_nowait()) is not END_OF_REQUEST:
        out.append(item)
    return out


def expected(prompt: list[int]) -> list[tuple[int, float]]:
    return [(prompt[p], pytest.approx(prompt_logprob(prompt, p))) for p in range(1, len(prompt))]


def received(msgs: list[pb.GenerateResponse]) -> list[tuple[int, float]]:
    assert msgs[0].prompt_logprobs, "the first message carries the prompt logprobs"
    assert not any(m.prompt_logprobs for m in msgs[1:]), "and no other message does"
    return [(e.token_id, e.logprob) for e in msgs[0].prompt_logprobs]


def engine_for(**config) -> Engine:
    s, w = make(**config)
    return Engine(s, workers=w, eos_token_ids=[EOS])


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_chunked_prefill_gives_every_position_once(ahead):
    engine = engine_for(max_num_batched_tokens=5, async_scheduling=ahead)
    prompt = list(range(1, 18))
    queue = start(engine, "chunked", prompt)
    run(engine)
    assert received(messages(queue)) == expected(prompt)


def test_prefix_cache_hits_are_not_taken_for_the_positions_wanted():
    engine = engine_for()
    prompt = list(range(1, 22))  # 5 full blocks
    engine.add("first", prompt, pb.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    run(engine)
    plans = []
    queue = start(engine, "second", prompt)
    run(engine, plans)
    assert plans[0].new_sequences[0].num_computed_tokens == 0
    assert plans[0].new_sequences[0].num_prompt_logprobs == 2
    msgs = messages(queue)
    assert msgs[0].cached_tokens == 0
    assert received(msgs) == expected(prompt)


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_preemption_mid_prompt_neither_repeats_nor_skips_positions(ahead):
    engine = engine_for(num_blocks=10, block_size=4, max_num_batched_tokens=6, async_scheduling=ahead)
    prompts = {f"r{i}": [i + 2] * 3 + list(range(10, 21 + i)) for i in range(3)}
    queues = {rid: start(engine, rid, p, max_tokens=6) for rid, p in prompts.items()}
    plans = []
    run(engine, plans)
    asked = Counter(new.seq_id for plan in plans for new in plan.new_sequences if new.HasField("num_prompt_logprobs"))
    assert max(asked.values()) > 1, "a sequence was preempted before its prompt logprobs were all in"
    for rid, prompt in prompts.items():
        msgs = messages(queues[rid])
        assert received(msgs) == expected(prompt), rid
        assert sum(len(m.token_ids) for m in msgs) == 6


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_n_sequences_compute_the_prompt_logprobs_once(ahead):
    engine = engine_for(async_scheduling=ahead)
    prompt = list(range(1, 14))
    plans = []
    queue = start(engine, "n", prompt, n=3)
    run(engine, plans)
    asked = [new.seq_id for plan in plans for new in plan.new_sequences if new.HasField("num_prompt_logprobs")]
    assert asked == [0]  # the first sequence only: its siblings share its prompt
    assert received(messages(queue)) == expected(prompt)


def test_a_one_token_prompt_has_no_entries():
    engine = engine_for()
    queue = start(engine, "one", [7])
    run(engine)
    msgs = messages(queue)
    assert not any(m.prompt_logprobs for m in msgs)
    assert sum(len(m.token_ids) for m in msgs) == 3


@pytest.mark.parametrize("k", [-1, 21])
def test_num_prompt_logprobs_out_of_range_is_refused_by_name(k):
    with pytest.raises(InvalidRequest, match="^num_prompt_logprobs"):
        check_sampling(pb.SamplingParams(num_prompt_logprobs=k), vocab_size=64)


def test_after_preemption_the_positions_already_answered_come_from_the_cache():
    engine = engine_for(block_size=4, max_num_batched_tokens=6)
    s = engine.scheduler
    prompt = list(range(1, 21))
    queue = start(engine, "resumed", prompt)
    for _ in range(2):  # 12 of 20 prompt tokens computed: positions 1..12 answered
        engine.publish(s.update(engine.workers.execute(s.schedule())))
    s.preempt(s.running[0])
    plans = []
    run(engine, plans)
    readmitted = plans[0].new_sequences[0]
    assert readmitted.num_computed_tokens == 12 and readmitted.HasField("num_prompt_logprobs")
    assert received(messages(queue)) == expected(prompt)
