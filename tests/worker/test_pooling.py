"""The worker's pooled vectors against transformers' last hidden state (the base model's output after
its final norm, what sentence-transformers and vLLM pool), pooled the same way, on tiny random Qwen3
(a sentence-transformers checkpoint: last-token pooling, normalised, as Qwen3-Embedding declares)
and Llama (--pooler-config MEAN and CLS, not normalised) models: one prompt, many in one step beside
a generating sequence, a prompt chunked over steps, and one that starts on prefix-cached blocks.
Plus the pooling math and the runner's resolution from flags and files."""
import json

import pytest
import torch

from pagedserve.v1 import scheduler_pb2, worker_pb2
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.pooling import finish
from pagedserve.worker.pooling_config import PoolingConfigError, resolve_runner
from tests.helpers import tiny_models
from tests.helpers.model_driver import GREEDY, Driver
from tests.helpers.tiny_models import runner_config

TOLERANCE = 1e-4  # float32 on both sides: max absolute difference per entry
LAST, MEAN, CLS = scheduler_pb2.POOLING_TYPE_LAST, scheduler_pb2.POOLING_TYPE_MEAN, scheduler_pb2.POOLING_TYPE_CLS
PROMPTS = [[7], [5, 17, 300, 999, 42], [(31 * i + 11) % 1000 for i in range(19)],
           [(17 * i + 3) % 1000 for i in range(37)]]


def hf_pooled(hf_model, prompt, kind, normalize, dimensions=None):
    """transformers' base model's last_hidden_state [len, hidden], pooled as `kind` says."""
    with torch.inference_mode():
        states = hf_model.base_model(torch.tensor([prompt])).last_hidden_state[0].float()
    vector = {LAST: states[-1], MEAN: states.mean(dim=0), CLS: states[0]}[kind]
    if dimensions:
        vector = vector[:dimensions]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A sentence-transformers Qwen3 checkpoint served with --runner auto."""
    path = tmp_path_factory.mktemp("tiny-qwen3-embed")
    hf = tiny_models.build("qwen3", path)
    tiny_models.save_sentence_transformers(path, "lasttoken", normalize=True)
    return hf, ModelRunner(runner_config(path, num_gpu_blocks_override=128))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A plain Llama checkpoint served with --runner pooling --pooler-config MEAN, unnormalised."""
    path = tmp_path_factory.mktemp("tiny-llama-embed")
    hf = tiny_models.build("llama", path)
    config = runner_config(path, num_gpu_blocks_override=128, runner="pooling",
                           pooler_config='{"pooling_type": "MEAN", "normalize": false}')
    return hf, ModelRunner(config)


def pooling_new(d, seq_id, prompt, kind, normalize, dimensions=None, **kw):
    new = d.new(seq_id, prompt, params=GREEDY, **kw)
    new.pooling.CopyFrom(scheduler_pb2.PoolingParams(pooling_type=kind, normalize=normalize))
    if dimensions:
        new.pooling.dimensions = dimensions
    return new


def driver(runner) -> Driver:
    runner.poolers.clear()
    return Driver(runner)


def assert_close(got, expected):
    got = torch.tensor(list(got))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE


def test_worker_info_reports_the_resolved_pooler(qwen3, llama):
    info = qwen3[1].worker_info()
    assert (info.runner, info.pooler.pooling_type, info.pooler.normalize) == ("pooling", LAST, True)
    assert info.hidden_size == tiny_models.HIDDEN and not info.is_matryoshka
    info = llama[1].worker_info()
    assert (info.runner, info.pooler.pooling_type, info.pooler.normalize) == ("pooling", MEAN, False)


@pytest.mark.parametrize("kind", [LAST, MEAN, CLS])
def test_many_prompts_in_one_step_beside_a_generating_sequence(qwen3, llama, kind):
    hf, runner = qwen3 if kind == LAST else llama
    normalize = kind == LAST
    d = driver(runner)
    new = [pooling_new(d, i, p, kind, normalize) for i, p in enumerate(PROMPTS)]
    new.append(d.new(9, [3, 4, 5]))  # generates: it alone samples
    result = d.step(new, [d.sched(i, len(p)) for i, p in enumerate(PROMPTS)] + [d.sched(9, 3)])
    assert list(result.seq_ids) == [9] and len(result.token_ids) == 1
    assert [p.seq_id for p in result.pooled] == [0, 1, 2, 3]  # plan order
    for pooled, prompt in zip(result.pooled, PROMPTS):
        assert_close(pooled.embedding, hf_pooled(hf, prompt, kind, normalize))
    if normalize:
        assert abs(torch.tensor(list(result.pooled[3].embedding)).norm().item() - 1) < 1e-5
    # Next step: the generating sequence decodes, the finished pooling ones are freed.
    result = d.step(sched=[d.sched(9, 1)], freed=range(4))
    assert list(result.seq_ids) == [9] and not result.pooled
    assert not runner.poolers.states


@pytest.mark.parametrize("kind", [LAST, MEAN, CLS])
def test_a_prompt_chunked_over_steps(qwen3, llama, kind):
    """MEAN keeps a running sum across chunks, CLS its first row, LAST waits for the last."""
    hf, runner = qwen3 if kind == LAST else llama
    prompt, chunks = PROMPTS[3], [10, 1, 16, 10]  # 37 tokens
    d = driver(runner)
    new, done = [pooling_new(d, 0, prompt, kind, kind == LAST)], 0
    for n in chunks:
        result = d.step(new, [d.sched(0, n)])
        new, done = [], done + n
        if done < len(prompt):
            assert not result.pooled and not result.seq_ids
    assert [p.seq_id for p in result.pooled] == [0]
    assert_close(result.pooled[0].embedding, hf_pooled(hf, prompt, kind, kind == LAST))


def test_last_token_pooling_after_a_prefix_cache_hit(qwen3):
    """A second prompt sharing the first's 4 full blocks computes only its own tail."""
    hf, runner = qwen3
    first, second = PROMPTS[3][:20], PROMPTS[3][:16] + [1, 2, 3]
    d = driver(runner)
    d.step([pooling_new(d, 0, first, LAST, True)], [d.sched(0, len(first))])
    new = pooling_new(d, 1, second, LAST, True, table=d.tables[0][:4], num_computed=16)
    result = d.step([new], [d.sched(1, 3)])
    assert_close(result.pooled[0].embedding, hf_pooled(hf, second, LAST, True))


def test_a_bare_base_model_checkpoint_without_lm_head(tmp_path):
    """sentence-transformers saves the base model alone (no `model.` prefix, no LM head, untied):
    served for pooling it loads, and its vectors equal transformers'."""
    hf = tiny_models.build("qwen3", tmp_path / "full")
    assert not hf.config.tie_word_embeddings
    path = tiny_models.save_bin(hf, tmp_path / "bare", base_names=True)
    tiny_models.save_sentence_transformers(path, "lasttoken", normalize=True)
    runner = ModelRunner(runner_config(path, num_gpu_blocks_override=16))
    d = driver(runner)
    result = d.step([pooling_new(d, 0, PROMPTS[1], LAST, True)], [d.sched(0, 5)])
    assert_close(result.pooled[0].embedding, hf_pooled(hf, PROMPTS[1], LAST, True))


def test_mean_pooling_refuses_a_prefix_cache_hit(llama):
    _, runner = llama
    d = driver(runner)
    new = pooling_new(d, 0, PROMPTS[2], MEAN, False, table=[0, 1], num_computed=8)
    result = runner.execute(worker_pb2.StepPlan(step_id=1, new_sequences=[new], scheduled=[d.sched(0, 11)]))
    assert "MEAN pooling needs every position" in result.error


def test_dimensions_truncate_before_normalising(qwen3):
    hf, runner = qwen3
    d = driver(runner)
    result = d.step([pooling_new(d, 0, PROMPTS[2], LAST, True, dimensions=16)], [d.sched(0, 19)])
    assert_close(result.pooled[0].embedding, hf_pooled(hf, PROMPTS[2], LAST, True, dimensions=16))


def test_finish_math():
    v = torch.tensor([3.0, 4.0, 12.0])
    params = scheduler_pb2.PoolingParams(pooling_type=LAST, normalize=True, dimensions=2)
    assert finish(v, params).tolist() == pytest.approx([0.6, 0.8])
    params = scheduler_pb2.PoolingParams(pooling_type=LAST, normalize=True)
    assert finish(v, params).tolist() == pytest.approx([3 / 13, 4 / 13, 12 / 13])
    params = scheduler_pb2.PoolingParams(pooling_type=LAST, normalize=False)
    assert finish(v, params).tolist() == [3.0, 4.0, 12.0]
    assert finish(torch.zeros(3), scheduler_pb2.PoolingParams(normalize=True)).tolist() == [0, 0, 0]


class Config:
    pass


def test_runner_resolution(tmp_path):
    hf = Config()
    assert resolve_runner(tmp_path, "auto", None, hf).runner == "generate"
    runner = resolve_runner(tmp_path, "pooling", None, hf)  # vLLM's default for a decoder
    assert (runner.pooler.pooling_type, runner.pooler.normalize) == (LAST, True)
    tiny_models.save_sentence_transformers(tmp_path, "mean_tokens", normalize=False)
    runner = resolve_runner(tmp_path, "auto", None, hf)
    assert (runner.runner, runner.pooler.pooling_type, runner.pooler.normalize) == ("pooling", MEAN, False)
    runner = resolve_runner(tmp_path, "auto", '{"pooling_type": "cls", "normalize": true}', hf)
    assert (runner.pooler.pooling_type, runner.pooler.normalize) == (CLS, True)
    assert resolve_runner(tmp_path, "generate", None, hf).runner == "generate"
    hf.matryoshka_dimensions = [16, 32]
    runner = resolve_runner(tmp_path, "pooling", None, hf)
    assert runner.is_matryoshka and runner.matryoshka_dimensions == (16, 32)


@pytest.mark.parametrize("flag, fault", [
    ('{"pooling_type": "MAX"}', "pooling_type 'MAX'"),
    ('{"dimensions": 8}', "dimensions is not supported"),
    ('[1]', "must be a JSON object"),
    ('{"normalize": 1}', "normalize must be true or false"),
])
def test_bad_pooler_config_is_refused_by_name(tmp_path, flag, fault):
    with pytest.raises(PoolingConfigError, match=fault):
        resolve_runner(tmp_path, "pooling", flag, Config())


def test_unsupported_sentence_transformers_modules_are_refused(tmp_path):
    tiny_models.save_sentence_transformers(tmp_path, "max_tokens")
    with pytest.raises(PoolingConfigError, match="pooling_mode_max_tokens"):
        resolve_runner(tmp_path, "auto", None, Config())
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(PoolingConfigError, match="models.Dense is not supported"):
        resolve_runner(tmp_path, "auto", None, Config())
    with pytest.raises(PoolingConfigError, match="add --runner pooling"):
        resolve_runner(tmp_path, "generate", '{"normalize": true}', Config())


def rank_pooled(model_dir) -> list[list[float]]:
    """One tensor parallel rank's MEAN vectors of PROMPTS, prefilled together (run by
    pagedserve.worker.distributed.run_local_ranks)."""
    from pagedserve.worker import distributed

    runner = ModelRunner(runner_config(model_dir, rank=distributed.rank(), world_size=distributed.world_size(),
                                       runner="pooling", pooler_config='{"pooling_type": "MEAN"}'))
    d = Driver(runner)
    result = d.step([pooling_new(d, i, p, MEAN, True) for i, p in enumerate(PROMPTS)],
                    [d.sched(i, len(p)) for i, p in enumerate(PROMPTS)])
    return [list(p.embedding) for p in result.pooled]


def test_tensor_parallel_ranks_pool_as_transformers(tmp_path):
    from pagedserve.worker import distributed

    hf = tiny_models.build("llama", tmp_path)
    for rank, vectors in enumerate(distributed.run_local_ranks(2, rank_pooled, tmp_path)):
        assert len(vectors) == len(PROMPTS), f"rank {rank}"
        for vector, prompt in zip(vectors, PROMPTS):
            assert_close(vector, hf_pooled(hf, prompt, MEAN, True))
