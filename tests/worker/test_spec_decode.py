"""Speculative decoding end to end in one process: the real scheduler (n-gram drafts, KV slots,
rollback) driving the real ModelRunner (verification by rejection sampling, worker/
rejection_sampler.py), on every architecture's tiny random model. Greedy outputs must be the
tokens decoding without speculation gives, under chunked prefill, prefix caching and preemption;
and the rejection sampler's output distribution must be the target's (a chi-square test)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.validation import with_defaults
from pagedserve.worker import rejection_sampler
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.sampler import Sampler, SamplingOptions
from tests.helpers import tiny_models
from tests.helpers.model_driver import run_prompts

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})
V = tiny_models.VOCAB_SIZE
# A repeated phrase (drafts from the prompt), a prompt sharing its first blocks (prefix cache hits)
# and one of distinct tokens (drafts only from the model's own output, if it loops).
PHRASE = [(37 * i + 5) % V for i in range(7)]
PROMPTS = [PHRASE * 3, PHRASE * 2 + [11, 12, 13], [(31 * i + 11) % V for i in range(19)]]
MAX_TOKENS = 24


def generate(runner: ModelRunner, spec: str | None, num_blocks: int, budget: int, caching: bool = True,
             params: pb.SamplingParams | None = None):
    """Every prompt's output, run together by the scheduler's policy, and its scheduler."""
    outputs, s, _ = run_prompts(runner, PROMPTS, spec, num_blocks, budget, MAX_TOKENS, caching, params)
    return outputs, s


@pytest.fixture(scope="module", params=list(tiny_models.CONFIGS))
def runner(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_models.build(request.param, path)
    return ModelRunner(tiny_models.runner_config(path, num_gpu_blocks_override=64))


@pytest.mark.parametrize("num_blocks, budget, caching", [
    (64, 2048, True),   # prefix caching
    (64, 8, False),     # chunked prefill: prompts in chunks of 8 tokens beside the decodes
    (14, 2048, True),   # preemption: 14 blocks of 4 cannot hold the three sequences at once
])
def test_greedy_outputs_equal_decoding_without_speculation(runner, num_blocks, budget, caching):
    plain, base = generate(runner, None, num_blocks, budget, caching)
    spec, s = generate(runner, NGRAM, num_blocks, budget, caching)
    assert spec == plain
    assert s.speculator.num_draft_tokens > 0
    assert s.speculator.num_accepted_tokens > 0  # the repeated phrase gets drafts right
    if num_blocks == 14:
        assert base.num_preemptions > 0 and s.num_preemptions > 0


def test_seeded_sampling_draws_the_same_tokens_with_speculation(runner):
    """A position's draw depends only on (seed, position) and its history, so a seeded sampled
    request gives the same tokens with drafts (up to logits' rounding between a decode and a
    verification step, which a tiny model's float32 logits do not reach here)."""
    params = with_defaults(pb.SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=MAX_TOKENS,
                                             ignore_eos=True, presence_penalty=0.5))
    plain, _ = generate(runner, None, 64, 2048, params=params)
    spec, _ = generate(runner, NGRAM, 64, 2048, params=params)
    assert spec == plain


# ----- the rejection sampler's distribution ------------------------------------------------------

class Row:
    """A sequence as the sampler reads it."""

    def __init__(self, params, tokens, num_prompt=1):
        self.seq_id, self.params, self.token_ids, self.num_prompt, self.grammar = 0, params, tokens, num_prompt, None

    @property
    def num_generated(self):
        return len(self.token_ids) - self.num_prompt


def test_rejection_sampling_keeps_the_target_distribution():
    """A vocabulary of 6 tokens, one draft token: the first output token's frequencies over 20,000
    unseeded verifications match the target's softmax (temperature 0.7) by a chi-square test at
    p > 0.001 (5 degrees of freedom: statistic < 20.5), whether the draft is the likeliest token,
    an unlikely one or one top_k removes (never output: it has probability 0)."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * 2)  # [draft position, bonus position]
    params = SamplingOptions(temperature=0.7, top_k=5)
    target = torch.softmax(logits[0] / 0.7, -1)
    target[5] = 0
    target /= target.sum()
    n = 20_000
    for draft in (0, 3, 5):
        sampler = Sampler(6, [], seed=1, device="cpu")
        counts = np.zeros(6)
        accepted = 0
        batch = torch.cat([logits] * n)
        rows = [rejection_sampler.DraftPosition(Row(params, [1]), [1] + [draft] * i) for _ in range(n) for i in (0, 1)]
        drawn = sampler(batch, rows)
        spans = [(2 * j, j, [draft]) for j in range(n)]
        v = rejection_sampler.Verification(np.arange(2 * n), rows, spans)
        out = rejection_sampler.verify(v, drawn)
        for a, token in zip(v.accepted, out.token_ids):
            first = draft if a else token
            counts[first] += 1
            accepted += a
        expected = target.numpy() * n
        keep = expected > 0
        chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
        assert counts[~keep].sum() == 0
        assert chi2 < 20.5, (draft, counts, expected)
        assert abs(accepted / n - target[draft].item()) < 0.02  # P(accept) = p(draft)


def test_sampled_drafts_keep_the_target_distribution():
    """Drafts drawn from a draft distribution q unlike the target's p (accept_sampled, Leviathan
    et al. 2023): over 20,000 unseeded verifications of one draft, the first output token's
    frequencies match p (temperature 0.7, top_k 5: token 5 has p = 0 but q > 0) by a chi-square
    test at p > 0.001 (5 degrees of freedom: statistic < 20.5), and drafts are accepted at the
    rate sum_x min(p(x), q(x))."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * 2)  # [draft position, bonus position]
    params = SamplingOptions(temperature=0.7, top_k=5)
    q = torch.tensor([0.05, 0.1, 0.4, 0.1, 0.15, 0.2])
    sampler = Sampler(6, [], seed=1, device="cpu")
    n = 20_000
    rows = [rejection_sampler.DraftPosition(Row(params, [1]), [1]) for _ in range(n)]
    drafts = rejection_sampler.draw(q.expand(n, 6), sampler.uniforms(rows, "cpu", rejection_sampler.DRAFT_SALT))
    positions = [rejection_sampler.DraftPosition(Row(params, [1]), [1] + [int(d)] * i) for d in drafts for i in (0, 1)]
    batch = torch.cat([logits] * n)
    spans = [(2 * j, j, [int(d)]) for j, d in enumerate(drafts)]
    v = rejection_sampler.Verification(np.arange(2 * n), positions, spans)
    decided = rejection_sampler.verify_sampled(v, batch, sampler, {j: q[None] for j in range(n)})
    out = rejection_sampler.verify(v, sampler(batch, positions), decided)
    counts = np.zeros(6)
    for (_, _, draft), a, token in zip(spans, v.accepted, out.token_ids):
        counts[draft[0] if a else token] += 1
    p = sampler.distribution(logits[:1], positions[:1])[0]
    expected = p.numpy() * n
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert counts[~keep].sum() == 0 and (drafts == 5).sum() > 0  # p(5) = 0: drawn as drafts, never kept
    assert chi2 < 20.5, (counts, expected)
    assert abs(np.mean(v.accepted) - torch.minimum(p, q).sum().item()) < 0.02


def test_structured_outputs_check_drafts_against_the_grammar(runner):
    """A regex-constrained request: drafts the grammar refuses are rejected, those it allows are
    verified as any, and the output is the constrained greedy output without speculation."""
    params = with_defaults(pb.SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS,
        structured_outputs=pb.StructuredOutputParams(regex="(la |ba ){3}(la ){6}")))
    plain, _ = generate(runner, None, 64, 2048, params=params)
    spec, s = generate(runner, NGRAM, 64, 2048, params=params)
    assert spec == plain
    assert s.speculator.num_accepted_tokens > 0
