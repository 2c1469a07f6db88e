"""Continuations (GenerateRequest.resume_output_token_ids): a request re-sent with the tokens its
client already got goes on where it stopped, as if it had never left, against the fake worker."""
from __future__ import annotations

import pytest

from pagedserve.scheduler.engine import Engine
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.outboxes import END_OF_REQUEST
from pagedserve.scheduler.validation import InvalidRequest, check
from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers.scheduler_driver import EOS, VOCAB, make

PROMPT = [5, 6, 7, 8, 9, 10]
MAX_TOKENS = 9


def run(prompt, resumed=(), ahead=False, min_tokens=0):
    """Every message the engine streams for one request, and the plans' NewSequence entries."""
    s, w = make(async_scheduling=ahead)
    engine = Engine(s, workers=None, eos_token_ids=[EOS])
    params = pb.SamplingParams(max_tokens=MAX_TOKENS, n=1, temperature=0, ignore_eos=True,
                               min_tokens=min_tokens)
    queue = engine.add("r", prompt, params, resumed=list(resumed))
    new_sequences = []
    while s.has_work():
        plan = s.schedule()
        new_sequences.extend(plan.new_sequences)
        engine.publish(s.update(w.execute(plan)))
    messages = []
    while (item := queue.get_nowait()) is not END_OF_REQUEST:
        messages.append(item)
    assert s.kv.num_used_blocks == 0 and not s.requests
    return messages, new_sequences


def tokens_of(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
@pytest.mark.parametrize("cut", [1, 4, MAX_TOKENS - 1])
def test_a_continuation_streams_exactly_the_rest_of_the_undisturbed_output(cut, ahead):
    whole, _ = run(PROMPT, ahead=ahead)
    output = tokens_of(whole)
    assert len(output) == MAX_TOKENS
    rest, new = run(PROMPT, resumed=output[:cut], ahead=ahead)
    assert tokens_of(rest) == output[cut:]  # no token again, none missing
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].completion_tokens == MAX_TOKENS  # the resumed tokens count toward max_tokens
    assert rest[-1].prompt_tokens == len(PROMPT)
    # The worker recomputes prompt + resumed and knows how many were generated (seeds, penalties).
    assert list(new[0].token_ids) == PROMPT + output[:cut]
    assert new[0].num_generated == cut


def test_a_continuation_reports_only_its_prompts_cached_tokens():
    s, w = make()
    engine = Engine(s, workers=None, eos_token_ids=[EOS])
    params = pb.SamplingParams(max_tokens=MAX_TOKENS, n=1, temperature=0, ignore_eos=True)
    prompt = list(range(1, 13))  # three full blocks of 4
    first = engine.add("first", prompt, params)
    while s.has_work():
        engine.publish(s.update(w.execute(s.schedule())))
    output = [t for m in iter(first.get_nowait, END_OF_REQUEST) for t in m.token_ids]
    again = engine.add("again", prompt, params, resumed=output[:6])
    while s.has_work():
        engine.publish(s.update(w.execute(s.schedule())))
    messages = list(iter(again.get_nowait, END_OF_REQUEST))
    # prompt + 6 resumed = 18 tokens: 4 full blocks were cached, of which the prompt's 3.
    assert messages[-1].cached_tokens == len(prompt)
    assert tokens_of(messages) == output[6:]


MODEL = pb.ModelInfo(vocab_size=VOCAB, max_model_len=64, block_size=4)


def checked(resumed, **params):
    request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], params=pb.SamplingParams(**params),
                                 resume_output_token_ids=resumed)
    return check(request, MODEL, KVCacheManager(64, 4))


@pytest.mark.parametrize("resumed, params, words", [
    ([4, 5], {"n": 2, "max_tokens": 8}, "n is 2"),
    ([4] * 8, {"max_tokens": 8}, "nothing is left"),
    ([4, VOCAB], {"max_tokens": 8}, "outside the vocabulary"),
    ([4] * 61, {}, "nothing is left"),  # max_tokens unset: the room the prompt alone leaves
])
def test_a_continuation_that_cannot_go_on_is_refused_naming_the_field(resumed, params, words):
    with pytest.raises(InvalidRequest, match=f"^resume_output_token_ids: .*{words}"):
        checked(resumed, **params)


def test_max_tokens_left_unset_stays_the_room_the_original_prompt_leaves():
    assert checked([4, 5, 6]).max_tokens == MODEL.max_model_len - 3
