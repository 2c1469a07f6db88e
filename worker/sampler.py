"""Turning one row of logits per sampling sequence into one token each, in a single batched pass.

The order is vLLM's: logprobs from the raw logits; then token bans (allowed_token_ids, bad_words),
logit_bias and min_tokens; then repetition, frequency and presence penalties; the structured-output
bitmask of constrained rows (worker/structured_output.py); greedy rows take the argmax of that;
random rows go on through temperature, min_p, top-k/top-p and a draw.

What a step costs follows what its rows ask for (benchmarks/sampler.py): the rows that use bans,
bias, min_tokens, penalties or a grammar are copied out and processed alone; the others are read
where the LM head wrote them (greedy: one argmax pass). A random row costs a few passes over its
vocabulary: exp((logits - max) / T) (the softmax before normalising), the min_p/top-k/top-p masks
where asked for (top-p alone sorts the row, as vLLM does; with top-k only the top k), and an
inverse-CDF draw in two levels (sums of blocks of BLOCK tokens, then one block), which needs one
uniform number per row: drawing noise for every token (the exponential race) cost ~15x more on
the CPU at vocab 49k. On the CPU the greedy argmax and the draw run in C (cpu/argmax.c, cpu/draw.c:
one parallel region each, the same results as the torch ops a GPU runs).

Seeded rows draw their number from a generator seeded by (seed, num_generated): the same request
draws the same token whatever else is in the batch, and again after preemption and recompute.
"""
from dataclasses import dataclass, field

import torch

from pagedserve.v1 import scheduler_pb2
from pagedserve.worker.cpu.argmax import argmax_rows
from pagedserve.worker.cpu.draw import cpu_draw_rows
from pagedserve.worker.token_bans import apply_token_bans
from pagedserve.worker.structured_output import apply_bitmask


@dataclass(frozen=True)
class SamplingOptions:
    """One sequence's sampling parameters, as the sampler reads them. The defaults here serve rows
    built by hand (tests, benchmarks); the scheduler's resolved params set every field."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    allowed_token_ids: tuple[int, ...] = ()  # empty: all (worker/token_bans.py)
    bad_words: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_proto(cls, p: scheduler_pb2.SamplingParams) -> "SamplingOptions":
        """Reads the params the scheduler resolved and checked (scheduler/validation.py): every
        field with a default is set, top_k -1 is already 0; an unset seed or logprobs is none."""
        return cls(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            seed=p.seed if p.HasField("seed") else None,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logit_bias=dict(p.logit_bias),
            min_tokens=p.min_tokens,
            stop_token_ids=tuple(p.stop_token_ids),
            logprobs=p.logprobs if p.HasField("logprobs") else None,
            allowed_token_ids=tuple(p.allowed_token_ids),
            bad_words=tuple(tuple(w.token_ids) for w in p.bad_words),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[scheduler_pb2.TokenLogprob | None]  # per row; None where not asked for


# Top-p on the CPU sorts only the rows whose nucleus is longer than this. SmolLM2-135M-Instruct's,
# sampling a story at temperature 1: at top_p 0.9 at most 864 tokens (median 26), at 0.95 up to
# 2,008 (median 91, 92% within 1,024).
NUCLEUS_PREFIX = 1024

# Tokens per block of the two-level draw: a row's block sums are a short cumsum, and so is the one
# block the draw lands in (49,152 tokens: 192 blocks; 151,936: 594).
BLOCK = 256


def _seed_for(seed: int, num_generated: int) -> int:
    # splitmix64-style mix, so consecutive tokens of a request get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + num_generated + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _padded(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device).view(len(rows), width)


def _token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[len(rows), vocab] counts of each token per row; padding lands in a dropped extra column."""
    ids = _padded(rows, vocab_size, device)
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _column(values: list, like: torch.Tensor) -> torch.Tensor:
    """[len(values), 1] on like's device and dtype: one per-row parameter, built once per step."""
    return torch.tensor(values, device=like.device, dtype=like.dtype)[:, None]


def _needs_processing(s, in_min_tokens: bool) -> bool:
    """Whether row `s` uses anything before the argmax/draw: bans, bias, min_tokens, penalties, a grammar."""
    p = s.params
    return bool(p.allowed_token_ids or p.bad_words or p.logit_bias or in_min_tokens
                or p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty
                or (s.grammar is not None and not s.grammar.is_terminated()))


def draw_from_weights(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: weights [R, nb * BLOCK] >= 0 (float32, each row with a positive entry),
    uniforms [R] float64 in [0, 1). Returns [R] int64: index i with probability weights[i] / row sum.

    Two levels, so no pass over the whole row is a sequential cumsum: the row's block sums (then
    cumulated in float64), the block where u * total falls, then the cumsum of that block alone.
    Zero-weight entries own an empty interval and are never drawn, even where float rounding pushes
    the target past a block's end."""
    kernel = cpu_draw_rows() if weights.device.type == "cpu" else None
    if kernel is not None:  # the same draw in one parallel region (cpu/draw.c)
        out = torch.empty(weights.shape[0], dtype=torch.int64)
        uniforms = uniforms.contiguous()
        kernel(weights.data_ptr(), weights.shape[0], weights.shape[1], weights.stride(0), uniforms.data_ptr(),
               out.data_ptr())
        return out
    rows, width = weights.shape
    blocks = weights.view(rows, width // BLOCK, BLOCK)
    sums = blocks.sum(-1).double()  # summed in float32: a float64 sum was ~10x slower on the CPU
    cum = sums.cumsum(-1)
    target = (uniforms * cum[:, -1])[:, None]
    block = torch.searchsorted(cum, target, right=True)
    block = torch.minimum(block, _last_positive(sums))
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp_(min=0)), 0.0)
    inner = blocks.gather(1, block[:, :, None].expand(rows, 1, BLOCK)).squeeze(1).double()
    offset = torch.searchsorted(inner.cumsum(-1), target - before, right=True)
    offset = torch.minimum(offset, _last_positive(inner))
    return (block * BLOCK + offset).squeeze(1)


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """[R, 1]: the last column index of each row of x [R, N] holding a positive value."""
    positions = torch.arange(x.shape[1], device=x.device)
    return torch.where(x > 0, positions, 0).amax(dim=-1, keepdim=True)


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]: the tensor itself (no copy) when that is every row."""
    return logits if len(rows) == logits.shape[0] else logits[rows]


def _put(tokens: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """tokens with tokens[rows] = values: `values` itself when rows are all of them (no scatter)."""
    if len(rows) == tokens.shape[0]:
        return values
    tokens[rows] = values
    return tokens


def _exp_weights(logits: torch.Tensor, params, out: torch.Tensor | None = None) -> torch.Tensor:
    """exp(x / T - max / T) [R, vocab]: the temperature-scaled softmax before normalising (the best
    token weighs 1, to rounding: addcmul may fuse x * (1 / T) - max / T into one FMA), in two passes
    over the row after the max: addcmul, then exp in place."""
    inverse_t = _column([1.0 / p.temperature for p in params], logits)
    return torch.addcmul(-logits.amax(dim=-1, keepdim=True) * inverse_t, logits, inverse_t, out=out).exp_()


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs) -> SamplerOutput:
        """logits: [S, vocab] float32, one row per sequence in `seqs` (objects with .params,
        .token_ids, .num_prompt, .num_generated, .grammar); not modified."""
        params = [s.params for s in seqs]
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

        sub, processed_at = self._process(logits, seqs)

        tokens = torch.empty(len(seqs), dtype=torch.int64, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:  # the raw rows' argmax, then the processed rows' own (a few rows read twice, no copy)
            tokens = _put(tokens, greedy, argmax_rows(_rows(logits, greedy)))
            patch = [(i, processed_at[i]) for i in greedy if i in processed_at]
            if patch:
                at, source = map(list, zip(*patch))
                tokens[at] = sub[source].argmax(dim=-1)
        if random_rows:
            tokens = _put(tokens, random_rows, self._draw(logits, random_rows, seqs, sub, processed_at))

        if not want_logprobs:
            return SamplerOutput(tokens.tolist(), [None] * len(seqs))  # the step's one host sync
        return self._with_logprobs(tokens, raw_logprobs, want_logprobs, params)

    def _process(self, logits, seqs) -> tuple[torch.Tensor | None, dict[int, int]]:
        """The rows that use bans, bias, min_tokens, penalties or a grammar, copied out and
        processed: (their logits [P, vocab] or None, {row of logits: row of that copy})."""
        # min_tokens is checked here once: processing keys on it, and so does the EOS ban.
        in_min_tokens = [s.num_generated < s.params.min_tokens for s in seqs]
        processed = [i for i, s in enumerate(seqs) if _needs_processing(s, in_min_tokens[i])]
        sub = None
        if processed:  # only these rows are copied and get full-vocabulary work
            picked = [seqs[i] for i in processed]
            sub = logits[processed]
            apply_token_bans(sub, picked)
            self._apply_bias_and_min_tokens(sub, picked, [in_min_tokens[i] for i in processed])
            self._apply_penalties(sub, picked)
            apply_bitmask(sub, picked)
        return sub, {row: j for j, row in enumerate(processed)}

    def distribution(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        """[S, vocab] float32, rows summing to 1: for each of `seqs` (all with temperature > 0,
        as for __call__), the distribution its token is drawn from: after every processor,
        temperature, min_p, top-k and top-p. Speculative decoding's p and q (rejection_sampler.py).
        Raises ValueError for a greedy row (its distribution is a point mass: use __call__)."""
        if any(s.params.greedy for s in seqs):
            raise ValueError("distribution() is for sampled rows (temperature > 0)")
        sub, processed_at = self._process(logits, seqs)
        w = self._weights(logits, list(range(len(seqs))), seqs, sub, processed_at)[:, : logits.shape[1]]
        return w / w.sum(dim=-1, keepdim=True)

    def _apply_bias_and_min_tokens(self, logits, seqs, in_min_tokens) -> None:
        """In place, on the processed rows."""
        biased = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias.items()]
        # Before min_tokens, EOS and the stop ids may not be drawn: the scheduler would stop on them.
        banned = [
            (i, t)
            for i, s in enumerate(seqs)
            if in_min_tokens[i]
            for t in (*self.eos_token_ids, *s.params.stop_token_ids)
            if 0 <= t < self.vocab_size
        ]
        device = logits.device
        if biased:
            rows, cols, bias = zip(*biased)
            index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            logits.index_put_(index, torch.tensor(bias, device=device, dtype=logits.dtype), accumulate=True)
        if banned:
            rows, cols = zip(*banned)
            logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = float("-inf")

    def _apply_penalties(self, logits, seqs) -> None:
        """In place, on the processed rows that ask for a penalty."""
        rows = [
            i for i, s in enumerate(seqs)
            if s.params.repetition_penalty != 1 or s.params.presence_penalty or s.params.frequency_penalty
        ]
        if not rows:
            return
        device = logits.device
        sub = logits[rows]
        picked = [seqs[i] for i in rows]
        output_counts = _token_counts([s.token_ids[s.num_prompt:] for s in picked], self.vocab_size, device)
        in_output = output_counts > 0

        def column(name):
            return _column([getattr(s.params, name) for s in picked], sub)

        if any(s.params.repetition_penalty != 1 for s in picked):  # from the host: no device sync
            repetition = column("repetition_penalty")
            # vLLM's (and CTRL's) rule: over prompt and output, divide positive logits, multiply negative.
            seen = in_output | (_token_counts([s.token_ids[: s.num_prompt] for s in picked], self.vocab_size, device) > 0)
            penalized = torch.where(sub > 0, sub / repetition, sub * repetition)
            sub = torch.where(seen, penalized, sub)
        sub = sub - column("frequency_penalty") * output_counts - column("presence_penalty") * in_output
        logits[rows] = sub

    def _draw(self, logits, rows, seqs, sub, processed_at) -> torch.Tensor:
        """Sample one token for each of `rows` (indices into logits [S, vocab] and seqs, all with
        temperature > 0; processed rows read from `sub` at processed_at[row]). Returns [len(rows)]
        int64. Nothing passed in is modified."""
        weights = self._weights(logits, rows, seqs, sub, processed_at)
        return draw_from_weights(weights, self.uniforms([seqs[i] for i in rows], logits.device))

    def _weights(self, logits, rows, seqs, sub, processed_at) -> torch.Tensor:
        """[len(rows), vocab rounded up to BLOCK] float32: each row's unnormalised sampling
        weights (0 past the vocabulary), for draw_from_weights."""
        params = [seqs[i].params for i in rows]
        vocab = logits.shape[1]
        weights = torch.empty(len(rows), -(-vocab // BLOCK) * BLOCK, device=logits.device, dtype=torch.float32)
        w = weights[:, :vocab]
        _exp_weights(_rows(logits, rows), params, out=w)
        patch = [(j, processed_at[i]) for j, i in enumerate(rows) if i in processed_at]
        if patch:
            at, source = map(list, zip(*patch))
            w[at] = _exp_weights(sub[source], [params[j] for j in at])
        weights[:, vocab:] = 0
        if any(p.min_p > 0 for p in params):  # p < min_p * p_max; the best weighs 1 only to rounding
            w.masked_fill_(w < _column([p.min_p for p in params], w) * w.amax(dim=-1, keepdim=True), 0)
        if any(p.top_k > 0 for p in params):
            self._top_k(w, params)
        if any(p.top_p < 1 for p in params):
            self._top_p(w, params)
        return weights

    @staticmethod
    def _top_k(w, params) -> None:
        """In place: zero every weight below the row's k-th largest (ties with it stay, as vLLM's)."""
        vocab = w.shape[1]
        k_max = min(max(p.top_k for p in params), vocab)
        k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else k_max for p in params], device=w.device)
        kth = w.topk(k_max, dim=-1).values.gather(1, (k - 1)[:, None])
        off = _column([p.top_k <= 0 for p in params], w).bool()
        w.masked_fill_((w < kth) & ~off, 0)

    @staticmethod
    def _top_p(w, params) -> None:
        """In place, on the rows with top_p < 1: keep the smallest set of best tokens whose mass
        reaches top_p (of what min_p and top-k left). Where each of those rows has top-k too, only
        its top k are sorted (the rest weigh 0 already). Otherwise a GPU sorts the rows (cheap
        there, and no host read); the CPU, where sorting the vocabulary is the cost and a host read
        is free, sorts only the rows whose nucleus is not within their best NUCLEUS_PREFIX tokens."""
        rows = [i for i, p in enumerate(params) if p.top_p < 1]
        sub = w[rows]
        limit = _column([params[i].top_p for i in rows], w) * sub.sum(dim=-1, keepdim=True)
        vocab = w.shape[1]
        if all(params[i].top_k > 0 for i in rows):
            groups = [(slice(None), *sub.topk(min(max(params[i].top_k for i in rows), vocab), dim=-1))]
        elif w.device.type == "cpu" and vocab > NUCLEUS_PREFIX:
            best, order = sub.topk(NUCLEUS_PREFIX, dim=-1)
            outside = (best.sum(dim=-1, keepdim=True) <= limit).squeeze(1)
            longer = outside.nonzero().squeeze(1).tolist()  # a host read: free on the CPU
            groups = [(slice(None), best, order)]
            if longer:
                groups.append((longer, *sub[longer].sort(dim=-1, descending=True)))
        else:
            groups = [(slice(None), *sub.sort(dim=-1, descending=True))]
        out = torch.zeros_like(sub)
        for at, best, order in groups:  # a later group's rows overwrite the prefix's
            mass_before = best.cumsum(dim=-1) - best  # the best token always stays: its mass_before is 0
            best.masked_fill_(mass_before > limit[at], 0)
            out[at] = out[at].scatter_(1, order, best)
        w[rows] = out

    def uniforms(self, seqs, device, salt: int = 0) -> torch.Tensor:
        """[R] float64 in [0, 1): the unseeded rows' from the sampler's generator in one call,
        each seeded row's from its own (seed ^ salt, position) generator. The draw uses salt 0;
        speculative decoding's other draws (rejection_sampler.py) their own salts."""
        u = torch.empty(len(seqs), dtype=torch.float64, device=device)
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self.generator, dtype=torch.float64, device=device)
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                g = torch.Generator(device).manual_seed(_seed_for(s.params.seed ^ salt, s.num_generated))
                u[i] = torch.rand(1, generator=g, dtype=torch.float64, device=device)[0]
        return u

    def _with_logprobs(self, tokens, raw_logprobs, rows, params) -> SamplerOutput:
        """Token ids, and for `rows` the sampled token's logprob and the top k, brought to the host
        in one transfer (one sync per step on a GPU): ids are exact in float64 (vocab < 2**53), and
        float32 logprobs survive the round trip unchanged."""
        k_max = max(params[r].logprobs for r in rows)
        sampled = raw_logprobs.gather(1, tokens[rows][:, None]).squeeze(1)
        top_values, top_ids = raw_logprobs.topk(k_max, dim=-1)
        parts = (tokens, sampled, top_values.flatten(), top_ids.flatten())
        packed = torch.cat([p.double() for p in parts]).tolist()
        num, num_rows = len(params), len(rows)
        token_list = [int(t) for t in packed[:num]]
        sampled_list = packed[num: num + num_rows]
        tops = packed[num + num_rows:]
        values, ids = tops[: num_rows * k_max], tops[num_rows * k_max:]
        logprobs = [None] * num
        for j, r in enumerate(rows):
            k = params[r].logprobs
            top = [scheduler_pb2.TopLogprob(token_id=int(t), logprob=v)
                   for t, v in zip(ids[j * k_max: j * k_max + k], values[j * k_max: j * k_max + k])]
            logprobs[r] = scheduler_pb2.TokenLogprob(token_id=token_list[r], logprob=sampled_list[j], top=top)
        return SamplerOutput(token_list, logprobs)
