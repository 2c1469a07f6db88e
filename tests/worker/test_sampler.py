"""Each sampling feature has its effect, on hand-made logits."""
import pytest
import torch

from pagedserve.worker.cpu.argmax import argmax_rows
from pagedserve.worker.cpu.draw import cpu_draw_rows
from pagedserve.worker.sampler import BLOCK, Sampler, SamplingOptions, draw_from_weights
from tests.helpers.batch import sequence

VOCAB = 32
EOS = 1


def seq(prompt=(2, 3), generated=(), **params):
    """A live sequence with the params a request setting `params` gets."""
    return sequence(VOCAB, prompt, generated, **params)


def sampler(seed=0):
    return Sampler(VOCAB, [EOS], seed=seed, device="cpu")


def random_logits(rows, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(6)
    out = sampler()(logits, [seq(temperature=0) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


@pytest.mark.parametrize("vocab", [7, 256, 601, 1024])  # under a vector, whole vectors, a partial last one
def test_cpu_argmax_is_torch_argmax_ties_and_nans_included(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 4, (64, vocab), generator=g).float()  # many equal maxima: the first one wins
    x[1] = 0.0
    x[2, vocab // 3] = float("nan")
    x[3, -1] = float("nan")  # in the partial last vector, where there is one
    x[4, :] = float("-inf")
    x[5, -1] = 9.0
    x[6, 0], x[6, -1] = float("nan"), 9.0
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x[:, 1:]), x[:, 1:].argmax(dim=-1))  # rows apart by more than their length


def test_top_k_1_is_argmax_even_when_hot():
    logits = random_logits(6)
    for seed in range(5):
        out = sampler(seed)(logits, [seq(temperature=5.0, top_k=1) for _ in range(6)])
        assert out.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, :3] = torch.tensor([0.5, 0.3, 0.2]).log()
    drawn = {sampler(s)(logits, [seq(top_p=0.6)]).token_ids[0] for s in range(40)}
    assert drawn == {0, 1}  # 0.5 alone is under 0.6; 0.5 + 0.3 covers it


def test_min_p_cuts_the_unlikely():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, :3] = torch.tensor([0.5, 0.4, 0.1]).log()
    drawn = {sampler(s)(logits, [seq(min_p=0.5)]).token_ids[0] for s in range(40)}
    assert drawn == {0, 1}  # 0.1 < 0.5 * 0.5


def test_min_p_1_is_argmax_even_when_hot():
    logits = random_logits(64, seed=4) * 10  # large logits: x / T - max / T rounds off zero
    out = sampler()(logits, [seq(temperature=1.5, min_p=1.0) for _ in range(64)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    logits = torch.full((1, VOCAB), -30.0)
    logits[0, 4], logits[0, 9] = 0.0, -1.0986  # probabilities 3/4 and 1/4
    s = sampler()
    draws = torch.tensor([s(logits, [seq()]).token_ids[0] for _ in range(400)])
    assert set(draws.tolist()) == {4, 9}
    assert 0.65 < (draws == 4).float().mean() < 0.85


def test_logit_bias_forces_a_token():
    logits = random_logits(3)
    out = sampler()(logits, [seq(logit_bias={7: 100.0}), seq(temperature=0, logit_bias={7: 100.0}), seq(temperature=0)])
    assert out.token_ids[:2] == [7, 7]
    assert out.token_ids[2] == int(logits[2].argmax())


@pytest.mark.parametrize("penalty", [
    {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"repetition_penalty": 1.5},
])
def test_penalties_lower_repeated_tokens(penalty):
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 2.0, 1.9
    assert sampler()(logits, [seq(temperature=0, generated=[5], **penalty)]).token_ids == [6]
    assert sampler()(logits, [seq(temperature=0, generated=[6], **penalty)]).token_ids == [5]


def test_repetition_penalty_also_covers_the_prompt_and_negative_logits():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 5], logits[0, 6] = -1.0, -1.2
    # 5 is in the prompt: -1.0 * 1.5 = -1.5 falls below 6.
    assert sampler()(logits, [seq(prompt=[5], temperature=0, repetition_penalty=1.5)]).token_ids == [6]
    # presence and frequency count only generated tokens: the prompt's 5 is not penalised.
    assert sampler()(logits, [seq(prompt=[5], temperature=0, presence_penalty=1.0)]).token_ids == [5]


def test_frequency_penalty_grows_with_the_count():
    logits = torch.zeros(2, VOCAB)
    logits[:, 5], logits[:, 6] = 2.0, 1.0
    once = seq(temperature=0, generated=[5], frequency_penalty=0.6)
    thrice = seq(temperature=0, generated=[5, 5, 5], frequency_penalty=0.6)
    assert sampler()(logits, [once, thrice]).token_ids == [5, 6]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS], logits[:, 8], logits[:, 3] = 5.0, 4.0, 1.0
    early = seq(generated=[4], temperature=0, min_tokens=2, stop_token_ids=(8,))
    done = seq(generated=[4, 4], temperature=0, min_tokens=2, stop_token_ids=(8,))
    assert sampler()(logits, [early, done]).token_ids == [3, EOS]


def test_same_seed_same_draw_whatever_else_is_in_the_batch():
    row = random_logits(1, seed=1)
    seeded = seq(temperature=1.0, seed=1234, generated=[4, 5])
    alone = sampler(seed=0)(row, [seeded]).token_ids[0]
    others = random_logits(5, seed=2)
    crowd = [seq(temperature=1.0) for _ in range(5)]
    batch = torch.cat([others[:2], row, others[2:]])
    mixed = sampler(seed=99)(batch, crowd[:2] + [seeded] + crowd[2:]).token_ids[2]
    assert mixed == alone
    # ... and a flat distribution over many seeds does give different draws.
    flat = torch.zeros(1, VOCAB)
    assert len({sampler()(flat, [seq(seed=s)]).token_ids[0] for s in range(20)}) > 5


def test_seeded_draws_depend_on_the_position_not_on_history():
    flat = torch.zeros(1, VOCAB)
    draws = [sampler()(flat, [seq(seed=7, generated=[0] * n)]).token_ids[0] for n in range(12)]
    assert len(set(draws)) > 3  # each position draws afresh
    # After preemption the sequence comes back with the same num_generated: the same draw.
    assert sampler(seed=5)(flat, [seq(seed=7, generated=[0] * 4)]).token_ids[0] == draws[4]


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = random_logits(2)
    rows = [seq(temperature=0.7, logprobs=4, presence_penalty=1.0, generated=[3], logit_bias={2: 3.0}),
            seq(temperature=0, logprobs=0)]
    out = sampler()(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(expected[i, out.token_ids[i]]), abs=1e-5)
    top = out.logprobs[0].top
    assert [t.token_id for t in top] == expected[0].topk(4).indices.tolist()
    assert [t.logprob for t in top] == pytest.approx(expected[0].topk(4).values.tolist(), abs=1e-5)
    assert len(out.logprobs[1].top) == 0


@pytest.mark.parametrize("logprobs", [None, 3])
def test_one_host_transfer_per_step(monkeypatch, logprobs):
    """On a GPU every device-to-host read stalls the step: a batch using every feature reads once."""
    reads = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _f=original, **k: (reads.append(_n), _f(self, *a, **k))[1])
    rows = [seq(temperature=0, logprobs=logprobs), seq(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
            seq(temperature=1.0, seed=3, repetition_penalty=1.3, frequency_penalty=0.5, generated=[4, 4]),
            seq(temperature=0.5, logit_bias={7: 2.0}, min_tokens=2, logprobs=logprobs)]
    out = sampler()(random_logits(4), rows)
    assert reads == ["tolist"]
    assert len(out.token_ids) == 4 and all(isinstance(t, int) for t in out.token_ids)
    assert (out.logprobs[0] is None) == (logprobs is None)


def test_allowed_token_ids_are_the_only_draws_greedy_or_hot():
    logits = random_logits(4)
    allowed = (5, 17, 30)
    rows = [seq(temperature=0, allowed_token_ids=allowed), seq(temperature=2.0, allowed_token_ids=allowed),
            seq(temperature=0), seq(temperature=0, allowed_token_ids=(9,), logprobs=1)]
    for s in range(10):
        out = sampler(s)(logits, rows)
        assert out.token_ids[0] == max(allowed, key=lambda t: logits[0, t])
        assert out.token_ids[1] in allowed
        assert out.token_ids[2] == int(logits[2].argmax())  # its neighbours' bans do not reach it
        assert out.token_ids[3] == 9
    # logprobs stay the model's own: the forced token keeps its raw log-softmax value
    assert out.logprobs[3].logprob == pytest.approx(float(torch.log_softmax(logits[3], -1)[9]), abs=1e-5)


def test_bad_words_ban_a_sequence_only_after_its_prefix():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 8] = 5.0, 4.0  # greedy: 7, else 8
    words = ((3, 7), (6, 6, 7))
    assert sampler()(logits, [seq(generated=[3], bad_words=words, temperature=0)]).token_ids == [8]  # "3 7" banned
    assert sampler()(logits, [seq(generated=[6, 6], bad_words=words, temperature=0)]).token_ids == [8]
    # the prefix only in the prompt, or not at the end of the output, bans nothing
    assert sampler()(logits, [seq(prompt=(2, 3), bad_words=words, temperature=0)]).token_ids == [7]
    assert sampler()(logits, [seq(generated=[3, 4], bad_words=words, temperature=0)]).token_ids == [7]
    assert sampler()(logits, [seq(generated=[5, 6], bad_words=words, temperature=0)]).token_ids == [7]
    # a one-token word is banned everywhere
    logits[0, 20] = 1.0
    assert sampler()(logits, [seq(bad_words=((7,), (8,)), temperature=0)]).token_ids == [20]


@pytest.mark.parametrize("kernel", [True, False])  # cpu/draw.c, and the torch ops a GPU runs
@pytest.mark.parametrize("vocab", [7, 256, 600])  # under one block, exactly one, a partial last block
def test_two_level_draw_follows_the_weights_and_never_draws_a_zero(monkeypatch, vocab, kernel):
    if not kernel:
        monkeypatch.setattr("pagedserve.worker.sampler.cpu_draw_rows", lambda: None)
    else:
        assert cpu_draw_rows() is not None
    g = torch.Generator().manual_seed(vocab)
    weights = torch.zeros(1, -(-vocab // BLOCK) * BLOCK)
    picked = torch.randperm(vocab, generator=g)[:5]
    weights[0, picked] = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    rows = weights.expand(4000, -1).contiguous()
    draws = draw_from_weights(rows, torch.rand(4000, generator=g, dtype=torch.float64))
    counts = torch.bincount(draws, minlength=weights.shape[1]).float() / 4000
    assert set(draws.tolist()) <= set(picked.tolist())
    # 4000 draws: a frequency's standard error is at most 0.008; 0.04 is five of them.
    assert torch.allclose(counts[picked], weights[0, picked], atol=0.04)
    # the very ends of [0, 1) land on the first and the last weighted token
    ends = draw_from_weights(weights.expand(2, -1).contiguous(), torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64))
    assert ends.tolist() == [int(picked.min()), int(picked.max())]


def nucleus(logits_row, temperature, top_k, top_p):
    """The tokens top-k then top-p keep, by their definition: the best k, then the shortest prefix
    of them, best first, whose probability reaches top_p."""
    probs = torch.softmax(logits_row / temperature, -1)
    order = probs.argsort(descending=True).tolist()[: top_k or len(probs)]
    kept, mass = [], 0.0
    for t in order:
        kept.append(t)
        mass += float(probs[t])
        if mass >= top_p * float(probs[order].sum()):
            return set(kept)
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (6, 1.0), (6, 0.7), (3, 0.99)])
def test_top_k_top_p_keep_exactly_their_tokens(top_k, top_p):
    """A mixed batch: rows with and without each cut, so the batched masks must not leak across rows."""
    logits = random_logits(4, seed=top_k) / 3  # flat enough that 300 draws reach every kept token
    rows = [seq(temperature=0.8, top_k=top_k, top_p=top_p), seq(temperature=5.0),
            seq(temperature=0.8, top_k=top_k, top_p=top_p), seq(temperature=1.0, top_k=2)]
    drawn = [set() for _ in rows]
    for s in range(300):
        for i, token in enumerate(sampler(s)(logits, rows).token_ids):
            drawn[i].add(token)
    for i in (0, 2):
        assert drawn[i] == nucleus(logits[i], 0.8, top_k, top_p)
    assert drawn[3] == nucleus(logits[3], 1.0, 2, 1.0)
    assert len(drawn[1]) > 10  # the uncut row still ranges over the vocabulary


def test_processing_some_rows_leaves_the_others_and_the_logits_alone():
    logits = random_logits(5)
    before = logits.clone()
    rows = [seq(temperature=0), seq(temperature=0, frequency_penalty=2.0, generated=[int(logits[1].argmax())] * 10),
            seq(temperature=0, logit_bias={3: 50.0}), seq(temperature=0, allowed_token_ids=(8, 9)), seq(temperature=0)]
    out = sampler()(logits, rows)
    assert torch.equal(logits, before)  # the LM head's output is returned to tests as it was
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[4] == int(logits[4].argmax())
    assert out.token_ids[1] != int(logits[1].argmax())
    assert out.token_ids[2] == 3
    assert out.token_ids[3] == max((8, 9), key=lambda t: logits[3, t])


@pytest.mark.parametrize("prefix", [16, 10**9])  # the CPU's nucleus prefix in use, and the plain sort
def test_top_p_alone_keeps_its_nucleus_short_or_long(monkeypatch, prefix):
    monkeypatch.setattr("pagedserve.worker.sampler.NUCLEUS_PREFIX", prefix)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 300, generator=g) * 0.3  # nearly flat: 0.8 of it is ~240 tokens
    logits[0, :6] += torch.tensor([9.0, 8.5, 8.0, 7.5, 7.0, 6.5])  # a nucleus of a few tokens
    logits[2, 100:110] += 8.0
    params = [SamplingOptions(temperature=1.0, top_p=0.8), SamplingOptions(temperature=1.0, top_p=0.8),
              SamplingOptions(temperature=1.0)]
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    Sampler._top_p(weights, params)
    for i in (0, 1):
        assert set(weights[i].nonzero().flatten().tolist()) == nucleus(logits[i], 1.0, 0, 0.8)
    assert len(nucleus(logits[0], 1.0, 0, 0.8)) < 16 < len(nucleus(logits[1], 1.0, 0, 0.8))
    assert torch.equal(weights[2], torch.exp(logits[2] - logits[2].amax()))  # no top_p: untouched
