"""The persistent batch: what the worker remembers about each live sequence between steps, and
how a step's plan becomes the input tensors of one varlen forward pass.

As in vLLM V1's InputBatch, a sequence's numbers live in preallocated arrays, one row per live
sequence: its token ids, how many are computed, its block table. A row is taken on add and
reused after free. A step's inputs (token ids, positions, cache slots, block tables, ...) are then
gathered from those arrays with a few vector operations into persistent staging buffers, and the
sampled tokens written back the same way: no Python loop over tokens, and none over sequences
but the one that reads the plan's messages.

The scheduler decides; this file only checks that a plan is consistent with what the worker
holds (an inconsistent plan is a bug on the other side, reported back as StepResult.error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagedserve.worker.attention import AttentionMetadata
from pagedserve.worker.sampler import SamplingOptions


class PlanError(ValueError):
    """The plan does not fit the worker's state: unknown sequence, missing blocks, ..."""


def blocks_per_seq(max_model_len: int, block_size: int) -> int:
    """The most blocks one sequence's table can hold: every position up to max_model_len."""
    return -(-max_model_len // block_size)


class SequenceState:
    """One live sequence of a PersistentBatch (made by its `add`): what the batch's arrays cannot
    hold (its sampling options, its grammar matcher), and views of its numbers there, for the
    sampler, structured outputs and prompt logprobs."""

    __slots__ = ("seq_id", "row", "num_prompt", "params", "num_prompt_logprobs", "grammar", "lora", "_batch")

    def __init__(self, batch: PersistentBatch, row: int, seq_id: int, num_prompt: int, params: SamplingOptions,
                 num_prompt_logprobs: int | None):
        self._batch, self.row, self.seq_id = batch, row, seq_id
        self.num_prompt = num_prompt  # token_ids[num_prompt:] were generated (penalties, seeds)
        self.params = params
        self.num_prompt_logprobs = num_prompt_logprobs  # set while the scheduler wants its prompt logprobs
        self.grammar: Any = None  # its xgrammar.GrammarMatcher when structured outputs constrain it
        self.lora: Any = None  # its lora_manager.LoraSpec when it runs a LoRA adapter

    @property
    def token_ids(self) -> list[int]:
        """The sequence's tokens, prompt then generated (a copy)."""
        return self._batch.token_ids[self.row, : self._batch.num_tokens[self.row]].tolist()

    @property
    def num_computed(self) -> int:
        """Leading tokens whose K/V sit in the cache."""
        return int(self._batch.num_computed[self.row])

    @property
    def num_generated(self) -> int:
        return int(self._batch.num_tokens[self.row]) - self.num_prompt

    @property
    def block_table(self) -> list[int]:
        return self._batch.block_table[self.row, : self._batch.num_table_blocks[self.row]].tolist()


@dataclass
class ScheduledStep:
    """A checked plan's scheduled sequences, in plan order."""

    rows: np.ndarray  # [S] int64: each sequence's batch row
    num_tokens: np.ndarray  # [S] int64: tokens it computes this step


@dataclass
class StepInputs:
    """One step's tensors, in batch order: decodes first (the torch backend batches them as one
    slice), plan order within decodes and within the rest."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: the last token of each sequence that samples
    rows: np.ndarray  # [B] int64: each scheduled sequence's batch row
    sampling_index: np.ndarray  # [S] int64: which of the B sample, in the order of logits_indices
    plan_index: np.ndarray  # [B] int64: each sequence's place in the plan

    @property
    def sampling_rows(self) -> np.ndarray:
        return self.rows[self.sampling_index]


class StagingBuffers:
    """Host buffers the step's inputs are written into, grown (doubled) when a step needs more
    and otherwise reused; pinned on CUDA, so one non-blocking copy takes each to the device."""

    def __init__(self, max_blocks: int, device: torch.device):
        self.max_blocks, self.device = max_blocks, device
        self.pin = device.type == "cuda"
        self.tokens = self.seqs = 0
        self.copied = None  # on CUDA: the event after the last step's copies (the next fill waits for it)
        self.reserve(256, 64)

    def _empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, pin_memory=self.pin)

    def reserve(self, num_tokens: int, num_seqs: int) -> None:
        if num_tokens > self.tokens:
            self.tokens = max(num_tokens, 2 * self.tokens)
            self.input_ids, self.positions, self.slot_mapping = (self._empty(self.tokens, torch.int64) for _ in range(3))
        if num_seqs > self.seqs:
            self.seqs = max(num_seqs, 2 * self.seqs)
            self.query_start_loc = self._empty(self.seqs + 1, torch.int32)
            self.seq_lens = self._empty(self.seqs, torch.int32)
            self.block_tables = self._empty(self.seqs * self.max_blocks, torch.int32)
            self.logits_indices = self._empty(self.seqs, torch.int64)

    def wait_for_last_copies(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if not self.pin else t.to(self.device, non_blocking=True)

    def record_copies(self) -> None:
        if self.pin:
            self.copied = torch.cuda.Event()
            self.copied.record()


class PersistentBatch:
    def __init__(self, block_size: int, num_blocks: int, max_model_len: int, vocab_size: int,
                 max_num_seqs: int = 256, device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_blocks = blocks_per_seq(max_model_len, block_size)
        self.seqs: dict[int, SequenceState] = {}
        self.by_row: list[SequenceState | None] = []
        self.free_rows: list[int] = []
        # One column more than max_model_len: a sequence that computes its last allowed position
        # still samples the token after it.
        self.token_ids = np.zeros((0, max_model_len + 1), dtype=np.int32)
        self.num_tokens = np.zeros(0, dtype=np.int64)
        self.num_computed = np.zeros(0, dtype=np.int64)
        self.block_table = np.zeros((0, self.max_blocks), dtype=np.int32)
        self.num_table_blocks = np.zeros(0, dtype=np.int64)
        self.seq_id_of_row = np.zeros(0, dtype=np.int64)
        self._grow(max(max_num_seqs, 1))
        self.staging = StagingBuffers(self.max_blocks, torch.device(device))

    def _grow(self, rows: int) -> None:
        """Room for `rows` more sequences: more live ones than --max-num-seqs is the scheduler's
        business (preempted sequences are freed here), so the arrays grow rather than refuse."""
        old = len(self.by_row)
        self.token_ids = np.concatenate([self.token_ids, np.zeros((rows, self.token_ids.shape[1]), np.int32)])
        self.block_table = np.concatenate([self.block_table, np.zeros((rows, self.max_blocks), np.int32)])
        self.num_tokens, self.num_computed, self.num_table_blocks, self.seq_id_of_row = (
            np.concatenate([a, np.zeros(rows, np.int64)])
            for a in (self.num_tokens, self.num_computed, self.num_table_blocks, self.seq_id_of_row))
        self.by_row += [None] * rows
        self.free_rows += reversed(range(old, old + rows))  # pop() takes the lowest row first

    def free(self, seq_ids) -> None:
        # Freeing twice is harmless: an abort may cross a finish.
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.by_row[seq.row] = None
                self.free_rows.append(seq.row)

    def clear(self) -> None:
        self.free(list(self.seqs))

    def add(self, new) -> SequenceState:
        """Add a worker_pb2.NewSequence; raises PlanError where it cannot be live here."""
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
        if n > self.max_model_len:
            raise PlanError(f"new sequence {new.seq_id} has {n} tokens, beyond max_model_len {self.max_model_len}")
        tokens = np.asarray(new.token_ids, dtype=np.int64)
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise PlanError(f"new sequence {new.seq_id} has token ids outside the vocabulary [0, {self.vocab_size})")
        params = SamplingOptions.from_proto(new.params)
        if not self.free_rows:
            self._grow(len(self.by_row))
        row = self.free_rows.pop()
        self.token_ids[row, :n] = tokens
        self.num_tokens[row], self.num_computed[row], self.num_table_blocks[row] = n, new.num_computed_tokens, 0
        self.seq_id_of_row[row] = new.seq_id
        seq = SequenceState(self, row, new.seq_id, num_prompt=n - new.num_generated, params=params,
                            num_prompt_logprobs=new.num_prompt_logprobs if new.HasField("num_prompt_logprobs") else None)
        self.seqs[new.seq_id] = self.by_row[row] = seq
        return seq

    def begin_step(self, scheduled) -> ScheduledStep:
        """Check the plan's ScheduledSequence entries and append their new blocks; raises
        PlanError, changing nothing, when the plan does not fit."""
        seq_ids = [s.seq_id for s in scheduled]
        if len(set(seq_ids)) != len(seq_ids):
            raise PlanError("a sequence is scheduled twice in one step")
        unknown = [i for i in seq_ids if i not in self.seqs]
        if unknown:
            raise PlanError(f"scheduled sequences {unknown} are not live on this worker (never added, or freed)")
        grown = [(k, s.new_block_ids) for k, s in enumerate(scheduled) if s.new_block_ids]
        bad_blocks = [b for _, ids in grown for b in ids if not 0 <= b < self.num_blocks]
        if bad_blocks:
            raise PlanError(f"block ids {bad_blocks} are out of range: the KV cache has {self.num_blocks} blocks")
        rows = np.fromiter((self.seqs[i].row for i in seq_ids), dtype=np.int64, count=len(seq_ids))
        num_tokens = np.fromiter((s.num_tokens for s in scheduled), dtype=np.int64, count=len(seq_ids))
        num_new_blocks = np.zeros(len(seq_ids), dtype=np.int64)
        for k, ids in grown:
            num_new_blocks[k] = len(ids)
        self._check(seq_ids, rows, num_tokens, self.num_table_blocks[rows] + num_new_blocks)
        for k, ids in grown:
            row = rows[k]
            have = self.num_table_blocks[row]
            self.block_table[row, have: have + len(ids)] = ids
            self.num_table_blocks[row] = have + len(ids)
        return ScheduledStep(rows, num_tokens)

    def _check(self, seq_ids: list[int], rows: np.ndarray, num_tokens: np.ndarray, num_blocks: np.ndarray) -> None:
        """Raises PlanError naming the first sequence whose tokens or blocks do not add up."""
        start = self.num_computed[rows]
        end = start + num_tokens
        too_many = (num_tokens <= 0) | (end > self.num_tokens[rows])
        if too_many.any():
            k = int(too_many.argmax())
            raise PlanError(f"sequence {seq_ids[k]}: cannot compute {num_tokens[k]} tokens from {start[k]} "
                            f"of its {self.num_tokens[rows[k]]}")
        too_long = end > self.max_model_len
        if too_long.any():
            k = int(too_long.argmax())
            raise PlanError(f"sequence {seq_ids[k]} would reach {end[k]} tokens, beyond max_model_len {self.max_model_len}")
        short = (num_blocks * self.block_size < end) | (num_blocks > self.max_blocks)
        if short.any():
            k = int(short.argmax())
            raise PlanError(f"sequence {seq_ids[k]} needs {-(-end[k] // self.block_size)} blocks for {end[k]} tokens "
                            f"but its table would have {num_blocks[k]}")

    def prepare_inputs(self, step: ScheduledStep) -> StepInputs:
        """Flatten one step's work into varlen tensors (on the staging device); the caller
        restores plan order for the results with StepInputs.plan_index."""
        plan_index = np.argsort(step.num_tokens != 1, kind="stable")  # decodes first, plan order kept
        rows, query_lens = step.rows[plan_index], step.num_tokens[plan_index]
        num_seqs = len(rows)
        cu = np.cumsum(query_lens)
        num_tokens = int(cu[-1])
        starts = self.num_computed[rows]
        seq_lens = starts + query_lens
        width = int(self.num_table_blocks[rows].max())
        s = self.staging
        s.reserve(num_tokens, num_seqs)
        s.wait_for_last_copies()

        # Per token: its position, hence its token id and its cache slot.
        positions = s.positions[:num_tokens].numpy()
        positions[:] = np.arange(num_tokens) + np.repeat(starts - (cu - query_lens), query_lens)
        token_rows = np.repeat(rows, query_lens)
        s.input_ids[:num_tokens].numpy()[:] = self.token_ids[token_rows, positions]
        blocks = self.block_table[token_rows, positions // self.block_size]
        s.slot_mapping[:num_tokens].numpy()[:] = blocks * self.block_size + positions % self.block_size

        query_start_loc = s.query_start_loc[: num_seqs + 1]
        query_start_loc.numpy()[1:] = cu  # [0] stays 0
        s.seq_lens[:num_seqs].numpy()[:] = seq_lens
        block_tables = s.block_tables[: num_seqs * width].view(num_seqs, width)
        block_tables.numpy()[:] = self.block_table[rows, :width]
        sampling_index = np.flatnonzero(seq_lens == self.num_tokens[rows])
        logits_indices = s.logits_indices[: len(sampling_index)]
        logits_indices.numpy()[:] = cu[sampling_index] - 1

        meta = AttentionMetadata(
            slot_mapping=s.to_device(s.slot_mapping[:num_tokens]),
            block_tables=s.to_device(block_tables),
            seq_lens=s.to_device(s.seq_lens[:num_seqs]),
            query_start_loc=s.to_device(query_start_loc),
            max_query_len=int(query_lens.max()),
            num_decodes=int(np.count_nonzero(query_lens == 1)),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )
        inputs = StepInputs(s.to_device(s.input_ids[:num_tokens]), s.to_device(s.positions[:num_tokens]), meta,
                            s.to_device(logits_indices), rows, sampling_index, plan_index)
        s.record_copies()
        return inputs

    def seqs_at(self, rows: np.ndarray) -> list[SequenceState]:
        """The live sequences at these batch rows, in their order (for the sampler)."""
        by_row = self.by_row
        return [by_row[r] for r in rows.tolist()]

    def finish_step(self, inputs: StepInputs, sampled: list[int]) -> None:
        """The step's tokens are computed, and each sampling sequence (StepInputs.sampling_rows,
        in order) gets its sampled token appended."""
        self.num_computed[inputs.rows] += inputs.meta.query_lens_cpu
        rows = inputs.sampling_rows
        self.token_ids[rows, self.num_tokens[rows]] = sampled
        self.num_tokens[rows] += 1

