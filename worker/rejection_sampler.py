"""Verifying draft tokens (speculative decoding): the scheduler appends k proposed tokens to a
decoding sequence for one step (ScheduledSequence.draft_token_ids); the forward pass computes them
as ordinary query tokens, and this file turns the k + 1 rows of logits into the tokens the
sequence keeps.

Rejection sampling (Leviathan et al. 2023, Chen et al. 2023) with a point-mass draft distribution
(n-gram drafts are deterministic): accept draft x with probability p(x), p the target's sampling
distribution at that position after every logits processor; on rejection draw from p with x
removed and renormalised. Drawing t ~ p and accepting x iff t == x does exactly that: P(accept) =
p(x), and given t != x, t is distributed as p without x, renormalised. So each position runs the
ordinary sampler (worker/sampler.py), with the history that position would have had had the
drafts before it been accepted: penalties, bad words, min_tokens and the per-position seed see the
accepted prefix. The first position whose draw differs from its draft ends the step with that draw;
if all k are accepted, the draw at position k + 1 is a bonus token. Sampled outputs therefore keep
the target's distribution, and greedy ones (argmax at each position) are the tokens decoding
without drafts gives; a seeded request even draws the same tokens, since a position's uniform
number depends only on (seed, position).

Structured outputs: the sequence's grammar matcher accepts the drafts one by one, recording its
bitmask before each (and after the last), then rolls back (`draft_grammars`); each position is
masked with its own state, so a draft the grammar refuses is never kept.

Sampled drafts (the draft model with temperature > 0, `samples_drafts`): draft x comes from the
draft's own distribution q, and `accept_sampled` keeps it with probability min(1, p(x) / q(x)),
replacing the first refused one by a draw from norm(max(0, p - q)) (Leviathan et al. 2023,
Algorithm 1; Chen et al. 2023), which again leaves every output position distributed as p. p is
the target sampler's distribution at that position (Sampler.distribution, every processor
applied); the uniforms come from the sampler's seeded streams, so a seeded request repeats.

The KV the step wrote for rejected drafts stays in the cache and is overwritten later: the batch
rolls num_computed back to the accepted prefix (`commit`), as the scheduler does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.v1 import worker_pb2
from pagedserve.worker.batch import PersistentBatch, PlanError
from pagedserve.worker.sampler import BLOCK, SamplerOutput, draw_from_weights

# Seeded streams of speculative decoding's own draws (the sampler's draw is salt 0): the draft's
# proposal, the acceptance test and the draw from the residual, each a function of (seed, position).
DRAFT_SALT, ACCEPT_SALT, RESIDUAL_SALT = 0x5D2AF7, 0xACC3E7, 0x2E51D0


class DraftPosition:
    """What the sampler reads of one sequence at one draft position (SequenceState's interface):
    its parameters and its tokens up to, not including, the token drawn there."""

    __slots__ = ("seq_id", "params", "token_ids", "num_prompt", "grammar")

    def __init__(self, seq, tokens: list[int], grammar=None):
        self.seq_id, self.params, self.num_prompt = seq.seq_id, seq.params, seq.num_prompt
        self.token_ids = tokens
        self.grammar = grammar  # a DraftGrammar where structured outputs constrain the sequence

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt


class DraftGrammar:
    """A grammar matcher's state at one draft position, captured before sampling (the matcher
    itself is at the last real token): what apply_bitmask reads of it."""

    __slots__ = ("mask", "terminated")

    def __init__(self, mask, terminated: bool):
        self.mask, self.terminated = mask, terminated

    def is_terminated(self) -> bool:
        return self.terminated

    def fill_next_token_bitmask(self, bitmask, index: int) -> None:
        bitmask[index] = self.mask


def draft_grammars(matcher, drafts: list[int], vocab_size: int) -> list[DraftGrammar]:
    """The matcher's state before each draft and after the last (k + 1 of them), found by
    accepting the drafts and rolling back. Past a draft the grammar refuses, the states are
    "terminated" (unconstrained): those rows can never be kept, as the refused draft is masked
    out of the row before them and so is rejected there."""
    import xgrammar
    states, taken = [], 0
    for i in range(len(drafts) + 1):
        terminated = matcher.is_terminated()
        mask = xgrammar.allocate_token_bitmask(1, vocab_size)
        if not terminated:
            matcher.fill_next_token_bitmask(mask, 0)
        states.append(DraftGrammar(mask[0], terminated))
        if i == len(drafts) or terminated or not matcher.accept_token(drafts[i]):
            break
        taken += 1
    if taken:
        matcher.rollback(taken)
    states += [DraftGrammar(None, True)] * (len(drafts) + 1 - len(states))
    return states


def append_drafts(batch: PersistentBatch, scheduled) -> dict[int, list[int]]:
    """Writes each scheduled sequence's drafts after its tokens, for this step; returns
    {batch row: drafts}. Raises PlanError, changing nothing, for drafts on a sequence that is not
    decoding (one token left to compute), past max_model_len or outside the vocabulary."""
    drafts = {}
    for entry in scheduled:
        if not entry.draft_token_ids:
            continue
        seq = batch.seqs.get(entry.seq_id)
        if seq is None:
            raise PlanError(f"scheduled sequence {entry.seq_id} is not live on this worker")
        row, tokens = seq.row, list(entry.draft_token_ids)
        length = int(batch.num_tokens[row])
        if batch.num_computed[row] + 1 != length or entry.num_tokens != 1 + len(tokens):
            raise PlanError(f"sequence {entry.seq_id}: drafts need one token left to compute and "
                            f"num_tokens = 1 + drafts")
        if length + len(tokens) > batch.max_model_len or min(tokens) < 0 or max(tokens) >= batch.vocab_size:
            raise PlanError(f"sequence {entry.seq_id}: drafts past max_model_len or outside the vocabulary")
        drafts[row] = tokens
    for row, tokens in drafts.items():
        length = int(batch.num_tokens[row])
        batch.token_ids[row, length: length + len(tokens)] = tokens
        batch.num_tokens[row] = length + len(tokens)
    return drafts


def drop_drafts(batch: PersistentBatch, drafts: dict[int, list[int]]) -> None:
    """Undoes append_drafts (the plan was rejected)."""
    for row, tokens in drafts.items():
        batch.num_tokens[row] -= len(tokens)


@dataclass
class Verification:
    """One step's draft verification: per sampling sequence (in sampling order), its rows of the
    expanded logits, and afterwards what it accepted."""

    logits_indices: np.ndarray          # [R] int64: hidden-state rows to compute logits for
    positions: list                     # [R] SequenceState or DraftPosition, what the sampler reads
    spans: list[tuple[int, int, list[int]]]  # per sampling sequence: (first row in R, batch row, drafts)
    accepted: list[int] | None = None   # per sampling sequence: drafts accepted


def expand(batch: PersistentBatch, sampling, sampling_rows: np.ndarray, logits_indices: np.ndarray,
           drafts: dict[int, list[int]]) -> Verification:
    """The rows to sample: one per plain sequence, k + 1 per sequence with k drafts (its last
    real token, then each draft), each with the history the sampler must see there."""
    indices, positions, spans = [], [], []
    for seq, row, last in zip(sampling, sampling_rows.tolist(), logits_indices.tolist()):
        tokens = drafts.get(row, [])
        spans.append((len(indices), row, tokens))
        if not tokens:
            indices.append(last)
            positions.append(seq)
            continue
        history = seq.token_ids  # with the drafts appended
        length = len(history) - len(tokens)
        k = len(tokens)
        indices.extend(range(last - k, last + 1))
        grammars = (draft_grammars(seq.grammar, tokens, batch.vocab_size) if seq.grammar is not None
                    else [None] * (k + 1))
        positions.extend(DraftPosition(seq, history[: length + i], grammars[i]) for i in range(k + 1))
    return Verification(np.asarray(indices, dtype=np.int64), positions, spans)


def samples_drafts(seq) -> bool:
    """Whether a draft model samples seq's drafts from its q (temperature > 0) rather than taking
    its argmax (a point mass, verified by `verify` alone): not where logprobs are asked for (each
    position's entry is the ordinary draw's) or a grammar constrains the sequence (its states are
    known only once the drafts are)."""
    return not seq.params.greedy and seq.params.logprobs is None and seq.grammar is None


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[R] int64: index i of each row of weights [R, V] (>= 0, a positive entry per row) with
    probability weights[i] / row sum, by inverse CDF with uniforms [R] float64 (the sampler's)."""
    padded = torch.nn.functional.pad(weights.float(), (0, -weights.shape[1] % BLOCK))
    return draw_from_weights(padded.contiguous(), uniforms)


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft: list[int], accept_u: torch.Tensor,
                   residual_u: torch.Tensor) -> tuple[int, int | None]:
    """Rejection sampling of drafts drawn from q (Leviathan et al. 2023, Algorithm 1): draft i is
    accepted when accept_u[i] < p[i, x] / q[i, x]; the first refused is replaced by a draw from
    max(0, p[i] - q[i]) renormalised (from p[i] itself where that is all 0: p == q to rounding).
    p [k + 1, V] and q [k, V]: rows summing to 1; accept_u, residual_u [k] float64 in [0, 1).
    Returns (drafts accepted, the replacing token), or (k, None) when all are (the bonus token
    is then the ordinary draw at the last position)."""
    k = len(draft)
    index = torch.tensor(draft, device=p.device)
    rows = torch.arange(k, device=p.device)
    p_x, q_x = p[rows, index].double().cpu(), q[rows, index].double().cpu()
    refused = (accept_u.cpu() * q_x >= p_x).nonzero()
    if not len(refused):
        return k, None
    a = int(refused[0, 0])
    residual = (p[a] - q[a]).clamp_(min=0)
    if not bool(residual.sum() > 0):
        residual = p[a]
    return a, int(draw(residual[None], residual_u[a: a + 1])[0])


def verify_sampled(v: Verification, logits: torch.Tensor, sampler, q_by_row: dict[int, torch.Tensor]
                   ) -> dict[int, tuple[int, int | None]]:
    """accept_sampled for every span whose drafts were sampled (q_by_row: batch row -> q [k, V]),
    logits [R, V] being the verification's rows; {span index: (accepted, token)} for `verify`."""
    spans = [(j, first, row, draft) for j, (first, row, draft) in enumerate(v.spans) if draft and row in q_by_row]
    if not spans:
        return {}
    index = [first + i for _, first, _, draft in spans for i in range(len(draft) + 1)]
    at = [v.positions[i] for i in index]
    p = sampler.distribution(logits[index], at)
    drafts_at = [v.positions[first + i] for _, first, _, draft in spans for i in range(len(draft))]
    accept_u = sampler.uniforms(drafts_at, logits.device, ACCEPT_SALT)
    residual_u = sampler.uniforms(drafts_at, logits.device, RESIDUAL_SALT)
    out, p_start, u_start = {}, 0, 0
    for j, _, row, draft in spans:
        k = len(draft)
        out[j] = accept_sampled(p[p_start: p_start + k + 1], q_by_row[row], draft,
                                accept_u[u_start: u_start + k], residual_u[u_start: u_start + k])
        p_start, u_start = p_start + k + 1, u_start + k
    return out


def verify(v: Verification, drawn: SamplerOutput,
           sampled: dict[int, tuple[int, int | None]] | None = None) -> SamplerOutput:
    """From the draws at every row, each sampling sequence's final token (the first draw that
    differs from its draft, or the bonus draw) and its logprobs; records v.accepted. `sampled`
    (verify_sampled's) decides the spans whose drafts were drawn from a q."""
    tokens, logprobs, accepted = [], [], []
    for j, (first, _, draft) in enumerate(v.spans):
        if sampled and j in sampled:
            a, token = sampled[j]
            accepted.append(a)
            tokens.append(drawn.token_ids[first + a] if token is None else token)
            logprobs.append(None)  # samples_drafts: no logprobs asked for
            continue
        a = 0
        while a < len(draft) and drawn.token_ids[first + a] == draft[a]:
            a += 1
        accepted.append(a)
        tokens.append(drawn.token_ids[first + a])
        logprobs.append(drawn.logprobs[first + a])
    v.accepted = accepted
    return SamplerOutput(tokens, logprobs)


def commit(batch: PersistentBatch, v: Verification) -> None:
    """Before batch.finish_step: drops the rejected drafts from each sequence's tokens and takes
    their positions back from num_computed (finish_step then adds the whole query length); a
    constrained sequence's matcher accepts the accepted drafts."""
    for (_, row, draft), a in zip(v.spans, v.accepted):
        if draft:
            rejected = len(draft) - a
            batch.num_tokens[row] -= rejected
            batch.num_computed[row] -= rejected
            matcher = batch.by_row[row].grammar
            for token in draft[:a]:  # the final token follows in structured_output.advance
                if matcher is not None and not matcher.is_terminated():
                    matcher.accept_token(token)


def accepted_drafts(batch: PersistentBatch, v: Verification, drawn: SamplerOutput,
                    plan_order: dict[int, int]) -> list[worker_pb2.AcceptedDrafts]:
    """StepResult.accepted, in plan order (plan_order: batch row -> place in the plan)."""
    out = []
    for (first, row, draft), a in zip(v.spans, v.accepted):
        if draft:
            entries = drawn.logprobs[first: first + a]
            out.append((plan_order[row], worker_pb2.AcceptedDrafts(
                seq_id=int(batch.seq_id_of_row[row]), token_ids=draft[:a], num_draft_tokens=len(draft),
                logprobs=[e for e in entries if e is not None])))
    return [entry for _, entry in sorted(out, key=lambda x: x[0])]
