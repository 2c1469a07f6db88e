"""Speculative decoding in the scheduler (scheduler/speculation.py, ngram_proposer.py): the drafts
it plans, the KV slots it gives them and takes back, and outputs identical to decoding without
drafts, against a fake worker whose model mostly repeats its context (so n-gram drafts are often
right, and sometimes wrong)."""
from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.scheduler.ngram_proposer import propose_ngram
from pagedserve.scheduler.request import Status
from pagedserve.scheduler.speculative_config import parse_speculative_config
from tests.helpers import fake_worker
from tests.helpers.scheduler_driver import VOCAB, add, drain, make, step

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})


def repeating_model(tokens: list[int], vocab_size: int) -> int:
    """Repeats the token 5 back, except where a hash of the context says otherwise (1 in 4)."""
    digest = int.from_bytes(hashlib.blake2b(repr(tokens).encode(), digest_size=8).digest(), "little")
    if digest % 4 == 0 or len(tokens) < 5:
        return digest % vocab_size
    return tokens[-5]


@pytest.fixture(autouse=True)
def repetitive(monkeypatch):
    monkeypatch.setattr(fake_worker, "next_token", repeating_model)


def run(prompts, spec: str | None, **kw):
    s, w = make(speculative_config=spec, **kw)
    requests = [add(s, f"r{i}", p, max_tokens, ignore_eos=True) for i, (p, max_tokens) in enumerate(prompts)]
    drain(s, w)
    assert s.kv.num_used_blocks == 0 and not w.seqs
    return [[seq.output_ids() for seq in r.sequences] for r in requests], s


def test_ngram_proposes_what_followed_the_longest_latest_match():
    assert propose_ngram([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 2, 1, 3) == [4, 9]  # 3-gram [1,2,3] wins
    assert propose_ngram([7, 2, 3, 5, 8, 2, 3, 6, 2, 3], 3, 1, 3) == [6, 2, 3]  # the latest [2,3]
    assert propose_ngram([1, 2, 3], 2, 1, 3) == []
    assert propose_ngram([4, 1, 4], 5, 2, 3) == []  # only a 1-gram matches, below the minimum


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"), ('{"method": "eagle"}', "not served"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "positive"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "exceeds"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "unknown keys"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs"),
    ('{"method": "draft_model", "num_speculative_tokens": 2, "model": "x", "prompt_lookup_max": 3}', "unknown keys"),
])
def test_bad_speculative_config_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(text)


def test_draft_model_config_names_its_model():
    config = parse_speculative_config('{"method": "draft_model", "model": "/m", "num_speculative_tokens": 3}')
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "/m", 3)


@pytest.mark.parametrize("ahead", [False, True])
def test_outputs_match_decoding_without_drafts_and_drafts_are_accepted(ahead):
    prompts = [([1, 2, 3, 4, 5, 1, 2, 3], 30), ([9, 8, 7], 12), (list(range(10, 30)), 25)]
    plain, _ = run(prompts, None, async_scheduling=ahead)
    spec, s = run(prompts, NGRAM, async_scheduling=ahead)
    assert spec == plain
    sp = s.speculator
    assert sp.num_drafts > 0 and sp.num_accepted_tokens > sp.num_draft_tokens / 5
    assert sp.num_accepted_per_pos[0] >= sp.num_accepted_per_pos[1] >= sp.num_accepted_per_pos[2] > 0
    assert sum(sp.num_accepted_per_pos) == sp.num_accepted_tokens


def test_drafts_stop_at_max_tokens_and_the_step_count_drops():
    prompt = [1, 2, 3, 4, 5] * 4
    _, plain = run([(prompt, 20)], None)
    out, s = run([(prompt, 20)], NGRAM)
    assert len(out[0][0]) == 20
    assert s.next_step_id < plain.next_step_id


def test_a_draft_plan_carries_its_tokens_and_their_slots():
    s, w = make(speculative_config=NGRAM, block_size=4)
    request = add(s, "r", [1, 2, 3, 4, 5, 1, 2, 3, 4], 10, ignore_eos=True)
    step(s, w)  # the prompt
    seq = request.sequences[0]
    drafts = propose_ngram(seq.token_ids, 3, 1, 3)
    table = len(s.kv.block_table(seq))
    plan, _ = step(s, w)
    (entry,) = plan.scheduled
    assert drafts and list(entry.draft_token_ids) == drafts and entry.num_tokens == 1 + len(drafts)
    # Slots for the drafts too: 10 tokens then 3 drafts need 4 blocks of 4.
    assert table + len(entry.new_block_ids) == -(-(seq.num_prompt_tokens + 1 + len(drafts)) // 4)


# Random streams as in test_scheduler.py, with drafts: preemption, prefix caching, chunked prefill
# (small budgets), async scheduling; every output equals the one without speculation.
prefixes = [[1, 2, 3, 4, 5, 1, 2, 3], [20, 21, 22, 20, 21], []]
requests = st.tuples(st.sampled_from(range(len(prefixes))),
                     st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=8), st.integers(1, 16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(requests, min_size=1, max_size=6), num_blocks=st.integers(10, 40),
       budget=st.sampled_from([3, 8, 64]), caching=st.booleans(), ahead=st.booleans())
def test_random_streams_with_drafts_give_the_outputs_without(reqs, num_blocks, budget, caching, ahead):
    prompts = [(prefixes[p] + suffix, max_tokens) for p, suffix, max_tokens in reqs
               if -(-(len(prefixes[p] + suffix) + max_tokens) // 4) <= num_blocks]
    kw = dict(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget,
              enable_prefix_caching=caching, async_scheduling=ahead)
    plain, _ = run(prompts, None, **kw)
    spec, s = run(prompts, NGRAM, **kw)
    assert spec == plain
    assert all(seq.status is Status.FINISHED for r in s.requests.values() for seq in r.sequences)


@pytest.mark.parametrize("caching", [False, True])
def test_parallel_sampling_siblings_each_speculate(caching):
    def outputs(spec):
        s, w = make(speculative_config=spec, enable_prefix_caching=caching)
        request = add(s, "r", [1, 2, 3, 4, 5, 1, 2, 3], 20, n=3, ignore_eos=True)
        drain(s, w)
        return [seq.output_ids() for seq in request.sequences], s
    plain, _ = outputs(None)
    spec, s = outputs(NGRAM)
    assert spec == plain and s.speculator.num_accepted_tokens > 0
