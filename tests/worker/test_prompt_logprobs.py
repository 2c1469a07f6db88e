"""The worker's prompt logprobs against transformers' log_softmax on tiny random Llamas: a whole
prompt beside decodes, a prompt chunked over steps, a sequence that starts on prefix-cached blocks
(only the positions it computes come back), and every rank at tensor parallel size 2."""
import pytest
import torch

from pagedserve.v1 import worker_pb2
from tests.helpers import tiny_models
from tests.helpers.model_driver import GREEDY, LONG_PROMPT, PROMPTS, Driver
from tests.helpers.tiny_models import BLOCKS_PER_SEQUENCE, runner_config
from tests.helpers.tiny_models import PROMPTS as TINY_PROMPTS
from pagedserve.worker import distributed

TOLERANCE = 1e-3  # fp32 on both sides
K = 3


def hf_prompt_logprobs(hf_model, prompt):
    """[len(prompt) - 1, vocab]: row i is the distribution of prompt[i + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def new_with_logprobs(d, seq_id, prompt, k=K, **kw):
    new = d.new(seq_id, prompt, params=GREEDY, **kw)
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


def rank_prompt_logprobs(model_dir) -> list[list[tuple[int, float, int, list[int]]]]:
    """One tensor parallel rank's prompt logprobs (run by pagedserve.worker.distributed.run_local_ranks) for
    tiny_models.PROMPTS prefilled together: per prompt, (token, logprob, rank, top ids) per position."""
    from pagedserve.worker import distributed
    from pagedserve.worker.model_runner import ModelRunner

    runner = ModelRunner(runner_config(model_dir, rank=distributed.rank(), world_size=distributed.world_size()))
    new = [worker_pb2.NewSequence(seq_id=i, token_ids=p, params=GREEDY,
                                  num_prompt_logprobs=K) for i, p in enumerate(TINY_PROMPTS)]
    scheduled = [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=len(p), new_block_ids=list(
        range(i * BLOCKS_PER_SEQUENCE, (i + 1) * BLOCKS_PER_SEQUENCE))) for i, p in enumerate(TINY_PROMPTS)]
    result, _ = runner.run_step(worker_pb2.StepPlan(step_id=1, new_sequences=new, scheduled=scheduled))
    by_seq = {chunk.seq_id: chunk.logprobs for chunk in result.prompt_logprobs}
    return [[(e.token_id, e.logprob, e.rank, [t.token_id for t in e.top]) for e in by_seq.get(i, [])]
            for i in range(len(TINY_PROMPTS))]


@pytest.mark.stack  # starts a process
def test_tensor_parallel_ranks_give_transformers_prompt_logprobs(tmp_path):
    hf_model = tiny_models.build("llama", tmp_path)
    for rank, per_prompt in enumerate(distributed.run_local_ranks(2, rank_prompt_logprobs, tmp_path)):
        for prompt, entries in zip(TINY_PROMPTS, per_prompt):
            expected = hf_prompt_logprobs(hf_model, prompt) if len(prompt) > 1 else torch.empty(0)
            assert len(entries) == len(prompt) - 1, f"rank {rank}"
            for position, (token, logprob, token_rank, top) in enumerate(entries, start=1):
                row = expected[position - 1]
                assert token == prompt[position]
                assert abs(logprob - row[token].item()) < TOLERANCE, f"rank {rank}, position {position}"
                assert token_rank == int((row >= row[token]).sum())
                assert top == row.topk(K).indices.tolist()
