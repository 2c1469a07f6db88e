"""Live sequences and steps built as the worker builds them: a PersistentBatch fed plan messages
(worker_pb2), each sequence's params resolved from a request's fields as the scheduler resolves
them. For the tests of what reads a batch's sequences or steps: the sampler, structured outputs,
the attention backends, the CUDA graph buffers."""
from __future__ import annotations

import torch

from pagedserve.scheduler.validation import with_defaults
from pagedserve.v1 import scheduler_pb2, worker_pb2
from pagedserve.worker.batch import PersistentBatch, SequenceState, StepInputs


def resolved(**fields) -> scheduler_pb2.SamplingParams:
    """The params the scheduler hands the worker for a request that sets `fields` (bad_words as
    tuples of token ids)."""
    bad_words = [scheduler_pb2.TokenBanSequence(token_ids=w) for w in fields.pop("bad_words", ())]
    return with_defaults(scheduler_pb2.SamplingParams(**fields, bad_words=bad_words))


class Batch:
    """A PersistentBatch and a stand-in scheduler's bookkeeping: sequence ids and blocks handed
    out in order, generated tokens appended through steps as the model runner runs them."""

    def __init__(self, vocab_size: int, max_model_len: int = 256, block_size: int = 16, num_blocks: int = 1024):
        self.batch = PersistentBatch(block_size, num_blocks, max_model_len, vocab_size, max_num_seqs=4)
        self.next_seq_id = self.next_block = 0

    def add(self, prompt, generated=(), **params) -> SequenceState:
        """A new sequence of `prompt` whose `generated` tokens came after it (as a preempted one
        comes back), sampling with the params a request setting `params` gets."""
        tokens = [*prompt, *generated]
        new = worker_pb2.NewSequence(seq_id=self.next_seq_id, token_ids=tokens, params=resolved(**params),
                                     num_generated=len(generated))
        self.next_seq_id += 1
        return self.batch.add(new)

    def step(self, seqs: list[SequenceState]) -> tuple[StepInputs, list[SequenceState]]:
        """One step that computes each sequence's tokens not yet computed, with the blocks they
        need: its inputs, and the sequences that sample, in the order the sampler takes them
        (PersistentBatch.finish_step takes their tokens in that order)."""
        scheduled = []
        for seq in seqs:
            num_tokens = len(seq.token_ids)
            needed = -(-num_tokens // self.batch.block_size) - len(seq.block_table)
            blocks = list(range(self.next_block, self.next_block + needed))
            self.next_block += needed
            scheduled.append(worker_pb2.ScheduledSequence(seq_id=seq.seq_id, num_tokens=num_tokens - seq.num_computed,
                                                          new_block_ids=blocks))
        inputs = self.batch.prepare_inputs(self.batch.begin_step(scheduled))
        return inputs, self.batch.seqs_at(inputs.sampling_rows)


def sequence(vocab_size: int, prompt, generated=(), **params) -> SequenceState:
    """A live sequence alone in its batch (what the sampler reads of one row)."""
    return Batch(vocab_size, max_model_len=len(prompt) + len(generated) + 1).add(prompt, generated, **params)


def step_inputs(work: list[tuple[list[int], int, int, list[int]]], block_size: int, num_blocks: int,
                device="cpu") -> StepInputs:
    """The inputs of one step over sequences given as (token ids, tokens computed before the step,
    tokens it computes, block table), as the worker's batch builds them from a plan."""
    max_len = max(len(tokens) for tokens, *_ in work)
    vocab_size = 1 + max(max(tokens) for tokens, *_ in work)
    batch = PersistentBatch(block_size, num_blocks, max_len, vocab_size, len(work), device)
    for i, (tokens, done, _, _) in enumerate(work):
        batch.add(worker_pb2.NewSequence(seq_id=i, token_ids=tokens, num_computed_tokens=done))
    return batch.prepare_inputs(batch.begin_step(
        [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=new, new_block_ids=table)
         for i, (_, _, new, table) in enumerate(work)]))


def scattered_step(work: list[tuple[int, int]], block_size: int, spare_blocks: int, g,
                   spares_last: bool = False) -> tuple[StepInputs, list[list[int]], int]:
    """One step over sequences given as (context before the step, new tokens), each sequence's
    blocks drawn at random from a cache of (blocks they need + spare_blocks) blocks; with
    `spares_last` the spare blocks are the cache's last ones, never in a table (what released
    entries can point at). Returns the step's inputs, each sequence's table and the cache's block
    count. `g`: the torch.Generator that draws the tables."""
    widths = [-(-(done + new) // block_size) for done, new in work]
    num_blocks = sum(widths) + spare_blocks
    order = torch.randperm(sum(widths) if spares_last else num_blocks, generator=g).tolist()
    tables = []
    for width in widths:
        tables.append(order[:width])
        order = order[width:]
    inputs = step_inputs([([0] * (done + new), done, new, table) for (done, new), table in zip(work, tables)],
                         block_size, num_blocks)
    return inputs, tables, num_blocks
