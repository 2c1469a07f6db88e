"""Embedding requests through the scheduler's policy and a real worker's ModelRunner (in process, no
gRPC): prefill only (chunked under a small token budget, no decode step), blocks back after, a
prefix-cache hit for last-token pooling and none for mean pooling, each vector equal to
transformers' pooled last hidden state; and scheduler/pooling.py's checks of what a request may ask."""
from collections import deque

import pytest
import torch

from pagedserve.scheduler import pooling as pooling_check
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.request import SamplingLimits
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig
from pagedserve.scheduler.validation import InvalidRequest
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import tiny_models
from tests.helpers.tiny_models import runner_config

TOLERANCE = 1e-4  # float32: max absolute difference per entry
BUDGET = 8  # max_num_batched_tokens: a 37-token prompt takes 5 steps
PROMPT = [(17 * i + 3) % 1000 for i in range(37)]
SHORT = [9, 8, 7, 6, 5]


def hf_pooled(hf, prompt, kind, normalize):
    with torch.inference_mode():
        states = hf.base_model(torch.tensor([prompt])).last_hidden_state[0].float()
    vector = states[-1] if kind == pb.POOLING_TYPE_LAST else states.mean(dim=0)
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-pool")
    hf = tiny_models.build("qwen3", path)
    return hf, ModelRunner(runner_config(path, num_gpu_blocks_override=64, runner="pooling"))


def info_of(runner) -> pb.ModelInfo:
    w = runner.worker_info()
    return pb.ModelInfo(served_model_name="tiny", max_model_len=w.max_model_len, vocab_size=w.vocab_size,
                        block_size=w.block_size, num_kv_blocks=w.num_kv_blocks, runner=w.runner,
                        pooler=w.pooler, is_matryoshka=w.is_matryoshka, hidden_size=w.hidden_size)


def drive(s: Scheduler, runner, plans: list) -> None:
    """The engine's loop (scheduler/engine.py): with async scheduling the next plan is built and
    executed before the result of the one before it is applied."""
    ahead = 2 if s.config.async_scheduling else 1
    sent = deque()
    while s.has_work() or sent:
        while len(sent) < ahead and s.has_work():
            plan = s.schedule()
            if not (plan.scheduled or plan.freed_seq_ids):
                break
            plans.append(plan)
            result = runner.execute(plan)
            assert not result.error, result.error
            assert not result.seq_ids  # nothing samples
            sent.append(result)
        s.update(sent.popleft())


def run(tiny, requests, kind, async_scheduling=False):
    """Each (request_id, prompt) through a fresh Scheduler to the end; returns the scheduler, the
    plans sent and the finished requests' sequences by request id."""
    hf, runner = tiny
    runner.batch.clear()
    runner.poolers.clear()
    info = info_of(runner)
    s = Scheduler(SchedulerConfig(num_blocks=info.num_kv_blocks, block_size=info.block_size,
                                  max_model_len=info.max_model_len, max_num_batched_tokens=BUDGET,
                                  async_scheduling=async_scheduling))
    seqs, plans = {}, []
    for rid, prompt in requests:
        request = pb.GenerateRequest(prompt_token_ids=prompt, pooling=pb.PoolingParams(pooling_type=kind))
        params, pooling = pooling_check.check(request, info, s.kv)
        seqs[rid] = s.add_request(rid, prompt, params, SamplingLimits.of(params, frozenset()), pooling=pooling).sequences[0]
    drive(s, runner, plans)
    return s, plans, seqs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_prefill_only_and_blocks_freed(tiny, async_scheduling):
    hf = tiny[0]
    s, plans, seqs = run(tiny, [("a", PROMPT), ("b", SHORT)], pb.POOLING_TYPE_LAST, async_scheduling)
    for rid, prompt in (("a", PROMPT), ("b", SHORT)):
        seq = seqs[rid]
        assert seq.finished and seq.finish_reason == pb.FINISH_REASON_STOP and seq.num_output == 0
        computed = sum(e.num_tokens for p in plans for e in p.scheduled if e.seq_id == seq.seq_id)
        assert computed == len(prompt)  # the prompt, chunked, and not one decode step
        got = torch.tensor(seq.embedding)
        assert (got - hf_pooled(hf, prompt, pb.POOLING_TYPE_LAST, True)).abs().max() < TOLERANCE
    assert max(sum(e.num_tokens for e in p.scheduled) for p in plans) <= BUDGET
    assert s.kv.num_used_blocks == 0 and not s.requests and not s.running


@pytest.mark.parametrize("kind, hits", [(pb.POOLING_TYPE_LAST, True), (pb.POOLING_TYPE_MEAN, False)])
def test_prefix_cache(tiny, kind, hits):
    """The second prompt shares the first's leading blocks: LAST takes them from the cache, MEAN
    computes every position; both equal transformers."""
    hf, runner = tiny
    second = PROMPT[:24] + [1, 2, 3]
    s, plans, seqs = run(tiny, [("a", PROMPT)], kind)
    # The same scheduler (and cache) takes the second request.
    info = info_of(runner)
    request = pb.GenerateRequest(prompt_token_ids=second, pooling=pb.PoolingParams(pooling_type=kind))
    params, pooling = pooling_check.check(request, info, s.kv)
    seq = s.add_request("b", second, params, SamplingLimits.of(params, frozenset()), pooling=pooling).sequences[0]
    drive(s, runner, plans)
    assert (seq.num_cached_tokens == 24) is hits and (seq.num_cached_tokens == 0) is not hits
    expected = hf_pooled(hf, second, kind, True)  # the model's default: normalised
    assert (torch.tensor(seq.embedding) - expected).abs().max() < TOLERANCE
    assert s.kv.num_used_blocks == 0


def model(**kw) -> pb.ModelInfo:
    values = dict(served_model_name="m", max_model_len=32, vocab_size=100, runner="pooling",
                  pooler=pb.PoolingParams(pooling_type=pb.POOLING_TYPE_LAST, normalize=True), hidden_size=64)
    return pb.ModelInfo(**{**values, **kw})


KV = KVCacheManager(64, 4, True)


def test_resolution_and_prompt_length():
    params, pooling = pooling_check.check(pb.GenerateRequest(prompt_token_ids=[1] * 32,
                                                             pooling=pb.PoolingParams()), model(), KV)
    assert params.max_tokens == 0 and (pooling.pooling_type, pooling.normalize) == (pb.POOLING_TYPE_LAST, True)
    _, pooling = pooling_check.check(pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(
        normalize=False)), model(), KV)
    assert pooling.normalize is False
    generate = pb.GenerateRequest(prompt_token_ids=[1], params=pb.SamplingParams(max_tokens=1))
    assert pooling_check.check(generate, model(runner="generate"), KV) is None


@pytest.mark.parametrize("request_, info, message", [
    (pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams()), model(runner="generate"),
     "pooling: this model is served for generation"),
    (pb.GenerateRequest(prompt_token_ids=[1]), model(), "pooling: this model is served for embeddings"),
    (pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(), params=pb.SamplingParams(n=2)),
     model(), "params: an embedding request takes no sampling parameters"),
    (pb.GenerateRequest(prompt_token_ids=[1] * 33, pooling=pb.PoolingParams()), model(),
     "prompt_token_ids: the prompt has 33 tokens, but the maximum context length is 32"),
    (pb.GenerateRequest(prompt_token_ids=[100], pooling=pb.PoolingParams()), model(),
     "prompt_token_ids: token id 100 is outside"),
    (pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(dimensions=8)), model(),
     'dimensions: model "m" does not support matryoshka representation'),
    (pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(dimensions=8)),
     model(is_matryoshka=True, matryoshka_dimensions=[16, 32]), "only supports [16, 32] matryoshka"),
    (pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(dimensions=0)),
     model(is_matryoshka=True), "dimensions: must be greater than 0"),
    (pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(dimensions=65)),
     model(is_matryoshka=True), "at most the model's hidden size 64"),
])
def test_refusals_name_the_field(request_, info, message):
    with pytest.raises(InvalidRequest) as e:
        pooling_check.check(request_, info, KV)
    assert message in str(e.value)


def test_matryoshka_dimensions_allowed():
    _, pooling = pooling_check.check(pb.GenerateRequest(prompt_token_ids=[1], pooling=pb.PoolingParams(
        dimensions=16)), model(is_matryoshka=True, matryoshka_dimensions=[16, 32]), KV)
    assert pooling.dimensions == 16
