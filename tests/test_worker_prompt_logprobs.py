"""The worker's prompt logprobs against transformers' log_softmax on a tiny random Llama: a whole
prompt beside decodes, a prompt chunked over steps, and a sequence that starts on prefix-cached
blocks (only the positions it computes come back)."""
import torch

from pagedserve.v1 import scheduler_pb2
from tests.test_worker_model import LONG_PROMPT, PROMPTS, Driver, runner, tiny  # noqa: F401 (fixtures)

TOLERANCE = 1e-3  # fp32 on both sides
K = 3


def hf_prompt_logprobs(hf_model, prompt):
    """[len(prompt) - 1, vocab]: row i is the distribution of prompt[i + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def new_with_logprobs(d, seq_id, prompt, k=K, **kw):
    new = d.new(seq_id, prompt, params=scheduler_pb2.SamplingParams(temperature=0), **kw)
    new.num_prompt_logprobs = k
    return new


def assert_matches(hf_model, prompt, first_position, entries, k=K):
    expected = hf_prompt_logprobs(hf_model, prompt)
    assert len(entries) == len(prompt) - first_position
    for i, entry in enumerate(entries):
        position = first_position + i
        row = expected[position - 1]
        assert entry.token_id == prompt[position]
        assert abs(entry.logprob - row[prompt[position]].item()) < TOLERANCE, f"position {position}"
        assert entry.rank == int((row >= row[prompt[position]]).sum()), f"position {position}"
        top_values, top_ids = row.topk(k)
        assert [t.token_id for t in entry.top] == top_ids.tolist(), f"position {position}"
        for t, v in zip(entry.top, top_values.tolist()):
            assert abs(t.logprob - v) < TOLERANCE


def test_whole_prompt_beside_decodes(runner, tiny):  # noqa: F811
    d = Driver(runner)
    d.step(new=[d.new(0, PROMPTS[0])], sched=[d.sched(0, len(PROMPTS[0]))])
    prompt = PROMPTS[3]
    result = d.step(new=[new_with_logprobs(d, 1, prompt)], sched=[d.sched(0, 1), d.sched(1, len(prompt))])
    assert [c.seq_id for c in result.prompt_logprobs] == [1]
    chunk = result.prompt_logprobs[0]
    assert chunk.first_position == 1
    assert_matches(tiny[1], prompt, 1, chunk.logprobs)
    decode = d.step(sched=[d.sched(0, 1), d.sched(1, 1)])
    assert not decode.prompt_logprobs, "decodes add no prompt entries"


def test_prompt_chunked_over_steps(runner, tiny):  # noqa: F811
    d = Driver(runner)
    prompt = LONG_PROMPT
    entries, firsts = [], []
    new = [new_with_logprobs(d, 0, prompt, k=0)]
    for size in (5, 7, len(prompt) - 12):
        result = d.step(new=new, sched=[d.sched(0, size)])
        new = []
        for chunk in result.prompt_logprobs:
            firsts.append(chunk.first_position)
            entries.extend(chunk.logprobs)
    assert firsts == [1, 6, 13]
    assert_matches(tiny[1], prompt, 1, entries, k=0)


def test_prefix_cached_start_returns_only_computed_positions(runner, tiny):  # noqa: F811
    d = Driver(runner)
    prompt = LONG_PROMPT
    d.step(new=[d.new(0, prompt)], sched=[d.sched(0, len(prompt))])
    cached = d.tables[0][:2]  # two full blocks: positions 0..7 sit in the cache
    result = d.step(new=[new_with_logprobs(d, 1, prompt, table=cached, num_computed=8)],
                    sched=[d.sched(1, len(prompt) - 8)])
    chunk = result.prompt_logprobs[0]
    assert chunk.first_position == 9
    assert_matches(tiny[1], prompt, 9, chunk.logprobs)
