"""Turning one row of logits per sampling sequence into one token each, in a single batched pass.

The order is vLLM's: logprobs from the raw logits; then token bans (allowed_token_ids, bad_words),
logit_bias and min_tokens; then repetition, frequency and presence penalties; the structured-output
bitmask of constrained rows (worker/structured_output.py); greedy rows take the argmax of that;
random rows go on through temperature, min_p, top-k/top-p and an exponential-race draw (argmax of
p / q with q ~ Exp(1), which picks token i with probability p_i). A feature no row uses costs nothing.

Seeded rows draw their noise from a generator seeded by (seed, num_generated): the same request
draws the same token whatever else is in the batch, and again after preemption and recompute.
"""
from dataclasses import dataclass, field

import torch

from pagedserve.v1 import scheduler_pb2
from worker.token_bans import apply_token_bans
from worker.structured_output import apply_bitmask


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


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs) -> SamplerOutput:
        """logits: [S, vocab] float32, one row per sequence in `seqs` (objects with .params,
        .token_ids, .num_prompt, .num_generated)."""
        params = [s.params for s in seqs]
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

        logits = apply_token_bans(logits, seqs)
        logits = self._apply_bias_and_min_tokens(logits, seqs)
        logits = self._apply_penalties(logits, seqs)
        logits = apply_bitmask(logits, seqs)  # structured outputs: only constrained rows
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            tokens[random_rows] = self._draw(logits[random_rows], [seqs[i] for i in random_rows])

        if not want_logprobs:
            return SamplerOutput(tokens.tolist(), [None] * len(seqs))  # the step's one host sync
        return self._with_logprobs(tokens, raw_logprobs, want_logprobs, params)

    def _apply_bias_and_min_tokens(self, logits, seqs):
        biased = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias.items()]
        # Before min_tokens, EOS and the stop ids may not be drawn: the scheduler would stop on them.
        banned = [
            (i, t)
            for i, s in enumerate(seqs)
            if s.num_generated < s.params.min_tokens
            for t in (*self.eos_token_ids, *s.params.stop_token_ids)
            if 0 <= t < self.vocab_size
        ]
        if not biased and not banned:
            return logits
        logits = logits.clone()
        if biased:
            rows, cols, bias = zip(*biased)
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(index, torch.tensor(bias, device=logits.device, dtype=logits.dtype), accumulate=True)
        if banned:
            rows, cols = zip(*banned)
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
        return logits

    def _apply_penalties(self, logits, seqs):
        rows = [
            i for i, s in enumerate(seqs)
            if s.params.repetition_penalty != 1 or s.params.presence_penalty or s.params.frequency_penalty
        ]
        if not rows:
            return logits
        device = logits.device
        sub = logits[rows]
        picked = [seqs[i] for i in rows]
        output_counts = _token_counts([s.token_ids[s.num_prompt:] for s in picked], self.vocab_size, device)
        in_output = output_counts > 0

        def column(name):
            return torch.tensor([getattr(s.params, name) for s in picked], device=device, dtype=sub.dtype)[:, None]

        repetition = column("repetition_penalty")
        if any(s.params.repetition_penalty != 1 for s in picked):  # from the host: no device sync
            # vLLM's (and CTRL's) rule: over prompt and output, divide positive logits, multiply negative.
            seen = in_output | (_token_counts([s.token_ids[: s.num_prompt] for s in picked], self.vocab_size, device) > 0)
            penalized = torch.where(sub > 0, sub / repetition, sub * repetition)
            sub = torch.where(seen, penalized, sub)
        sub = sub - column("frequency_penalty") * output_counts - column("presence_penalty") * in_output
        logits = logits.clone()
        logits[rows] = sub
        return logits

    def _draw(self, logits, seqs) -> torch.Tensor:
        """Sample one token per row of `logits` (all rows have temperature > 0)."""
        params = [s.params for s in seqs]
        device = logits.device
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        if any(p.min_p > 0 for p in params):
            probs = logits.softmax(dim=-1)
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = self._top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)

        noise = torch.empty_like(probs)
        seeded = [i for i, p in enumerate(params) if p.seed is not None]
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(generator=self.generator)
        for i in seeded:
            g = torch.Generator(device).manual_seed(_seed_for(params[i].seed, seqs[i].num_generated))
            noise[i].exponential_(generator=g)
        return (probs / noise.clamp_(min=1e-10)).argmax(dim=-1)

    def _top_k_top_p(self, logits, params):
        # One sort serves both: top-k cuts by rank, top-p by the cumulative mass of what is left.
        vocab = logits.shape[1]
        device = logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)[:, None]
        ranks = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the best token always stays: its mass_before is 0
        sorted_logits = sorted_logits.masked_fill((mass_before > top_p) & (top_p < 1), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)

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
