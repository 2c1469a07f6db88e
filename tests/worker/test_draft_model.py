"""Draft-model speculative decoding in one process: the real scheduler (placeholder drafts, KV
slots, rollback) driving a ModelRunner whose draft model (worker/draft_model.py) writes the drafts.
Greedy outputs must be the tokens decoding without speculation gives, under prefix caching,
chunked prefill and preemption, for several architectures; the draft's paged KV cache means it
runs each position of a sequence through its first forward at most once (O(new tokens) a step);
the target as its own draft must have every draft accepted; a draft of another vocabulary is
refused; the draft's cache is paid from the worker's KV budget. Sampled drafts (drawn from the
draft's q) keep the target's distribution (chi-square) and seeded requests repeat; under tensor
parallelism (2 gloo ranks) ngram and draft_model give the single-rank greedy outputs and the
ranks agree."""
from __future__ import annotations

import json

import pytest
import torch

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.validation import with_defaults
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import tiny_models
from tests.helpers.model_driver import run_prompts

V = tiny_models.VOCAB_SIZE
PHRASE = [(37 * i + 5) % V for i in range(7)]
PROMPTS = [PHRASE * 3, PHRASE * 2 + [11, 12, 13], [(31 * i + 11) % V for i in range(19)]]
MAX_TOKENS = 16


def spec(draft_dir) -> str:
    return json.dumps({"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3})


def generate(runner: ModelRunner, spec_text, num_blocks: int, budget: int, caching: bool = True, params=None):
    """Every prompt's greedy output, run together by the scheduler's policy; the scheduler; the
    number of steps."""
    return run_prompts(runner, PROMPTS, spec_text, num_blocks, budget, MAX_TOKENS, caching, params)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target, other = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    tiny_models.build("llama", target, seed=0)
    tiny_models.build("llama", other, seed=1)  # same architecture and vocabulary, other weights
    return target, other


@pytest.mark.parametrize("num_blocks, budget, caching", [
    (64, 2048, True),   # prefix caching: the draft recomputes the cached prefix itself
    (64, 8, False),     # chunked prefill
    (14, 2048, True),   # preemption
])
def test_greedy_outputs_equal_decoding_without_speculation(models, num_blocks, budget, caching):
    target, other = models
    runner = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=64,
                                                   speculative_config=spec(other)))
    plain, base, _ = generate(runner, None, num_blocks, budget, caching)
    runner.draft.num_forward_tokens = 0
    drafted, s, _ = generate(runner, spec(other), num_blocks, budget, caching)
    assert drafted == plain
    assert s.speculator.num_draft_tokens > 0
    assert s.speculator.num_accepted_tokens < s.speculator.num_draft_tokens  # rejections happened
    # Each computed position (all but a sequence's last token) runs through the draft's first
    # forward at most once: its K/V stays in the draft's cache, prefix-cache hits are caught up
    # once, an accepted draft's K/V is kept and a rejected one's recomputed; the last steps, where
    # max_tokens leaves no room for drafts, run no draft. Without a cache this would be the whole
    # sequence every step. A preempted sequence is recomputed.
    once = sum(len(p) + MAX_TOKENS - 1 for p in PROMPTS)
    assert runner.draft.num_forward_tokens >= sum(map(len, PROMPTS))
    if num_blocks == 14:
        assert base.num_preemptions > 0 and s.num_preemptions > 0
    else:
        assert runner.draft.num_forward_tokens <= once


@pytest.mark.parametrize("target_arch, draft_arch", [("qwen3", "llama"), ("gpt2", "opt")])
def test_other_architectures_as_target_and_draft(tmp_path, target_arch, draft_arch):
    """The draft is built by the target's loader: any served architecture can be either side."""
    tiny_models.build(target_arch, tmp_path / "t", seed=0)
    tiny_models.build(draft_arch, tmp_path / "d", seed=1)
    runner = ModelRunner(tiny_models.runner_config(tmp_path / "t", num_gpu_blocks_override=64,
                                                   speculative_config=spec(tmp_path / "d")))
    plain, _, _ = generate(runner, None, 64, 8)  # chunked prefill
    drafted, s, _ = generate(runner, spec(tmp_path / "d"), 64, 8)
    assert drafted == plain
    assert s.speculator.num_draft_tokens > 0


def test_the_draft_cache_is_paid_from_the_kv_budget(models):
    from pagedserve.worker.kv_cache import bytes_per_block

    target, other = models
    budget = 1 << 20
    plain = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=None, kv_cache_memory_bytes=budget))
    drafted = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=None, kv_cache_memory_bytes=budget,
                                                    speculative_config=spec(other)))
    num_layers, kv_heads, head_dim = plain.model.kv_cache_shape()
    target_block = bytes_per_block(num_layers, tiny_models.BLOCK_SIZE, kv_heads, head_dim, torch.float32)
    assert plain.num_blocks == budget // target_block
    assert drafted.num_blocks == budget // (target_block + drafted.draft.bytes_per_block(tiny_models.BLOCK_SIZE))
    assert len(drafted.draft.kv_caches) == 2 and drafted.draft.kv_caches[0][0].shape[0] == drafted.num_blocks


def test_the_target_as_its_own_draft_has_every_draft_accepted(models):
    target, _ = models
    runner = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=64,
                                                   speculative_config=spec(target)))
    plain, _, plain_steps = generate(runner, None, 64, 2048)
    drafted, s, steps = generate(runner, spec(target), 64, 2048)
    assert drafted == plain
    assert s.speculator.num_draft_tokens > 0
    assert s.speculator.num_accepted_tokens == s.speculator.num_draft_tokens
    assert steps < plain_steps  # up to k + 1 = 4 tokens a step


def test_seeded_sampled_drafts_repeat_and_a_drafting_target_accepts_them(models):
    """Sampled requests get drafts drawn from the draft's q, accepted with probability
    min(1, p/q): with the target as its own draft q = p (to the rounding of two batch shapes), so
    nearly every draft is accepted; a seeded request's tokens are the same on a second run (every
    draw comes from a (seed, position) stream), and differ across seeds."""
    target, _ = models
    runner = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=64,
                                                   speculative_config=spec(target)))

    def params(seed):
        return with_defaults(pb.SamplingParams(temperature=0.8, top_k=50, seed=seed, max_tokens=MAX_TOKENS,
                                               ignore_eos=True))
    first, s, _ = generate(runner, spec(target), 64, 2048, params=params(7))
    again, _, _ = generate(runner, spec(target), 64, 8, params=params(7))  # other steps, other batches
    other, _, _ = generate(runner, spec(target), 64, 2048, params=params(8))
    assert first == again
    assert other != first
    assert s.speculator.num_draft_tokens > 0
    assert s.speculator.num_accepted_tokens >= 0.9 * s.speculator.num_draft_tokens


def test_seeded_sampled_drafts_of_another_model_repeat(models):
    """A draft of other weights: its q differs from p, some drafts are refused and replaced by a
    residual draw, and the seeded outputs still repeat, whatever the batching."""
    target, other = models
    runner = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=64,
                                                   speculative_config=spec(other)))
    params = with_defaults(pb.SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=MAX_TOKENS,
                                             ignore_eos=True))
    first, s, _ = generate(runner, spec(other), 64, 2048, params=params)
    again, _, _ = generate(runner, spec(other), 64, 8, params=params)
    assert first == again
    assert 0 < s.speculator.num_accepted_tokens < s.speculator.num_draft_tokens


def test_a_draft_of_another_vocabulary_is_refused(models, tmp_path):
    target, _ = models
    tiny_models.build("llama", tmp_path, vocab_size=V // 2)
    with pytest.raises(ValueError, match="vocabulary"):
        ModelRunner(tiny_models.runner_config(target, speculative_config=spec(tmp_path)))


def test_a_draft_shorter_than_max_model_len_is_refused(models, tmp_path):
    target, _ = models
    tiny_models.build("llama", tmp_path, max_position_embeddings=64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelRunner(tiny_models.runner_config(target, speculative_config=spec(tmp_path)))


# ----- tensor parallelism ------------------------------------------------------------------------

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})


def rank_outputs(target_dir, spec_text: str, temperature: float = 0.0) -> tuple[list[list[int]], int, int]:
    """One tensor parallel rank (run by distributed.run_local_ranks) running PROMPTS with the real
    scheduler: its outputs, draft tokens proposed and accepted. The draft model is loaded by the
    target's loader, so it is sharded like the target; its logits are all-gathered, so every rank
    proposes the same drafts (sampled ones too: every rank's sampler has the same seed)."""
    from pagedserve.worker import distributed

    runner = ModelRunner(tiny_models.runner_config(target_dir, num_gpu_blocks_override=64, rank=distributed.rank(),
                                                   world_size=distributed.world_size(),
                                                   speculative_config=spec_text))
    params = with_defaults(pb.SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, ignore_eos=True))
    outputs, s, _ = generate(runner, spec_text, 64, 8, params=params)  # chunked prefill
    return outputs, s.speculator.num_draft_tokens, s.speculator.num_accepted_tokens


@pytest.mark.stack  # starts processes
def test_tensor_parallel_speculation_gives_the_single_rank_outputs(models):
    from pagedserve.worker import distributed

    target, other = models
    single = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=64))
    plain, _, _ = generate(single, None, 64, 8)
    for spec_text in (NGRAM, spec(other)):
        ranks = distributed.run_local_ranks(2, rank_outputs, target, spec_text)
        assert ranks[0] == ranks[1]  # the ranks agree on drafts and on what they accepted
        outputs, drafted, _ = ranks[0]
        assert outputs == plain
        assert drafted > 0
    sampled = distributed.run_local_ranks(2, rank_outputs, target, spec(other), 1.0)
    assert sampled[0] == sampled[1] and sampled[0][1] > 0


def test_sampled_drafts_of_another_model_keep_the_target_distribution(models, tmp_path):
    """End to end, with a draft whose LM head is the target's plus noise (its top 5 tokens only
    partly the target's, so q puts mass where p has none and p where q has none): N copies of one prompt, temperature 1, top_k 5, 3 tokens each. The
    second token is the one position verified (1 draft: max_tokens leaves room for one), so its
    frequencies must match the target's p given each copy's first token: expected counts are the
    sum of those conditional distributions; a chi-square test at p > 0.001 over the tokens that
    can occur (each copy's top 5; the statistic of a sum of unequal categoricals is, if anything,
    smaller than the multinomial's, so the bound is conservative). Drawing from p instead of the
    residual max(0, p - q) on a rejection fails it (statistic ~200 against ~48)."""
    from tests.helpers import hf_reference

    target, _ = models
    model = hf_reference.load(str(target))
    noisy = type(model).from_pretrained(target)
    with torch.no_grad():
        weight = noisy.lm_head.weight
        weight += torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 0.5
    noisy.save_pretrained(tmp_path)
    other = tmp_path
    n = 1000
    runner = ModelRunner(tiny_models.runner_config(target, num_gpu_blocks_override=1024,
                                                   speculative_config=spec(other)))
    prompt = PROMPTS[2][:6]
    params = with_defaults(pb.SamplingParams(temperature=1.0, top_k=5, max_tokens=3, ignore_eos=True))
    outputs, s, _ = run_prompts(runner, [prompt] * n, spec(other), 1024, 2048, 3, True, params)
    assert s.speculator.num_draft_tokens == n  # one draft per copy, at the second token
    assert 0.1 * n < s.speculator.num_accepted_tokens < 0.9 * n
    expected = torch.zeros(V, dtype=torch.float64)
    conditional = {}
    for first in {out[0] for out in outputs}:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + [first]])).logits[0, -1].double()
        top = logits.topk(5)
        conditional[first] = torch.zeros(V, dtype=torch.float64).index_put_((top.indices,), torch.softmax(top.values, -1))
    for out in outputs:
        expected += conditional[out[0]]
    counts = torch.bincount(torch.tensor([out[1] for out in outputs]), minlength=V).double()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a token outside the target's top 5 (the draft's q has some)
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()
    # At most keep.sum() - 1 degrees of freedom; their chi-square 0.999 quantile by Wilson and
    # Hilferty's approximation (z = 3.09), within 1% for df >= 10.
    df = int(keep.sum()) - 1
    bound = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3
    assert chi2 < bound, (chi2, bound)
