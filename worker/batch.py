"""The persistent batch: what the worker remembers about each live sequence between steps, and
how a step's plan becomes the input tensors of one varlen forward pass.

The scheduler decides; this file only checks that a plan is consistent with what the worker
holds (an inconsistent plan is a bug on the other side, reported back as StepResult.error).
"""
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from worker.attention import AttentionMetadata
from worker.sampler import SamplingOptions


class PlanError(ValueError):
    """The plan does not fit the worker's state: unknown sequence, missing blocks, ..."""


@dataclass
class SequenceState:
    seq_id: int
    token_ids: list[int]
    num_prompt: int  # token_ids[num_prompt:] were generated (penalties, seeds)
    params: SamplingOptions
    num_computed: int = 0  # leading tokens whose K/V sit in the cache
    block_table: list[int] = field(default_factory=list)
    num_prompt_logprobs: int | None = None  # set while the scheduler wants its prompt logprobs
    grammar: Any = None  # its xgrammar.GrammarMatcher when structured outputs constrain it

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S]: the last token of each sequence that samples
    sampling: list[SequenceState]  # the S sequences that sample, in the order of logits_indices
    seqs: list[SequenceState]  # every scheduled sequence, in batch order (meta.query_lens_cpu's)


class PersistentBatch:
    def __init__(self, block_size: int, num_blocks: int, max_model_len: int, vocab_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.seqs: dict[int, SequenceState] = {}

    def free(self, seq_ids) -> None:
        # Freeing twice is harmless: an abort may cross a finish.
        for seq_id in seq_ids:
            self.seqs.pop(seq_id, None)

    def add(self, new) -> None:
        """Add a worker_pb2.NewSequence."""
        n = len(new.token_ids)
        if new.seq_id in self.seqs:
            raise PlanError(f"new sequence {new.seq_id} is already live on this worker")
        if n == 0:
            raise PlanError(f"new sequence {new.seq_id} has no tokens")
        if new.num_computed_tokens >= n or new.num_generated > n:
            raise PlanError(
                f"new sequence {new.seq_id}: num_computed_tokens={new.num_computed_tokens} and "
                f"num_generated={new.num_generated} do not fit its {n} tokens (at least one must be computed)"
            )
        if min(new.token_ids) < 0 or max(new.token_ids) >= self.vocab_size:
            raise PlanError(f"new sequence {new.seq_id} has token ids outside the vocabulary [0, {self.vocab_size})")
        params = SamplingOptions.from_proto(new.params)
        self.seqs[new.seq_id] = SequenceState(
            new.seq_id, list(new.token_ids), n - new.num_generated, params, new.num_computed_tokens,
            num_prompt_logprobs=new.num_prompt_logprobs if new.HasField("num_prompt_logprobs") else None,
        )

    def begin_step(self, scheduled) -> list[tuple[SequenceState, int]]:
        """Check the plan's ScheduledSequence entries, append their new blocks, and return
        (sequence, num_tokens) in plan order."""
        if len({s.seq_id for s in scheduled}) != len(scheduled):
            raise PlanError("a sequence is scheduled twice in one step")
        unknown = [s.seq_id for s in scheduled if s.seq_id not in self.seqs]
        if unknown:
            raise PlanError(f"scheduled sequences {unknown} are not live on this worker (never added, or freed)")
        bad_blocks = [b for s in scheduled for b in s.new_block_ids if b >= self.num_blocks]
        if bad_blocks:
            raise PlanError(f"block ids {bad_blocks} are out of range: the KV cache has {self.num_blocks} blocks")
        work = []
        for s in scheduled:
            seq = self.seqs[s.seq_id]
            seq.block_table.extend(s.new_block_ids)
            end = seq.num_computed + s.num_tokens
            if s.num_tokens == 0 or end > len(seq.token_ids):
                raise PlanError(
                    f"sequence {s.seq_id}: cannot compute {s.num_tokens} tokens from {seq.num_computed} "
                    f"of its {len(seq.token_ids)}"
                )
            if end > self.max_model_len:
                raise PlanError(f"sequence {s.seq_id} would reach {end} tokens, beyond max_model_len {self.max_model_len}")
            if len(seq.block_table) * self.block_size < end:
                raise PlanError(
                    f"sequence {s.seq_id} needs {-(-end // self.block_size)} blocks for {end} tokens "
                    f"but its table has {len(seq.block_table)}"
                )
            work.append((seq, s.num_tokens))
        return work


def build_step_inputs(work: list[tuple[SequenceState, int]], block_size: int, device) -> StepInputs:
    """Flatten one step's work into varlen tensors. Decodes go first (the torch backend batches
    them as one slice); the caller restores plan order for the results."""
    work = sorted(work, key=lambda w: w[1] != 1)  # stable: plan order within each group
    seqs = [seq for seq, _ in work]
    query_lens = [n for _, n in work]
    starts = [seq.num_computed for seq in seqs]
    seq_lens = [s + n for s, n in zip(starts, query_lens)]
    num_decodes = sum(1 for n in query_lens if n == 1)
    max_blocks = max(len(seq.block_table) for seq in seqs)

    input_ids = torch.tensor(
        list(chain.from_iterable(seq.token_ids[s:e] for seq, s, e in zip(seqs, starts, seq_lens))), dtype=torch.int64
    )
    query_lens_t = torch.tensor(query_lens, dtype=torch.int32)
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    torch.cumsum(query_lens_t, 0, out=query_start_loc[1:])
    block_tables = torch.tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)

    # Per token: which sequence it belongs to, hence its position and its cache slot.
    token_seq = torch.repeat_interleave(torch.arange(len(seqs)), query_lens_t)
    offsets = torch.tensor(starts, dtype=torch.int64) - query_start_loc[:-1].long()
    positions = torch.arange(len(input_ids)) + offsets[token_seq]
    slot_mapping = block_tables[token_seq, positions // block_size].long() * block_size + positions % block_size

    sampling = [i for i, seq in enumerate(seqs) if seq_lens[i] == len(seq.token_ids)]
    logits_indices = query_start_loc[1:][sampling].long() - 1

    to = dict(device=device, non_blocking=True)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(**to),
        block_tables=block_tables.to(**to),
        seq_lens=seq_lens_t.to(**to),
        query_start_loc=query_start_loc.to(**to),
        max_query_len=max(query_lens),
        num_decodes=num_decodes,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
    return StepInputs(
        input_ids=input_ids.to(**to),
        positions=positions.to(**to),
        meta=meta,
        logits_indices=logits_indices.to(**to),
        sampling=[seqs[i] for i in sampling],
        seqs=seqs,
    )
