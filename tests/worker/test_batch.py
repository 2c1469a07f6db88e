"""The persistent batch (worker/batch.py) through the plans it is handed: sequences added into
rows (in order, freed ones reused, more rows than --max-num-seqs when needed), plans
checked whole before anything changes, a mixed step of prefill chunks and decodes flattened into
the varlen inputs and attention metadata, and the sampled tokens appended after it."""
import numpy as np
import pytest
import torch

from pagedserve.v1 import scheduler_pb2, worker_pb2
from pagedserve.worker.batch import PersistentBatch, PlanError

BLOCK_SIZE = 4


def new(seq_id, tokens, computed=0, generated=0, **fields):
    return worker_pb2.NewSequence(seq_id=seq_id, token_ids=tokens, num_computed_tokens=computed,
                                  num_generated=generated, params=scheduler_pb2.SamplingParams(**fields))


def sched(seq_id, num_tokens, blocks=()):
    return worker_pb2.ScheduledSequence(seq_id=seq_id, num_tokens=num_tokens, new_block_ids=blocks)


def make_batch(max_model_len=32, max_num_seqs=4):
    return PersistentBatch(BLOCK_SIZE, num_blocks=32, max_model_len=max_model_len, vocab_size=100,
                           max_num_seqs=max_num_seqs)


def numbers(seq):
    return seq.token_ids, seq.num_computed, seq.num_generated, seq.block_table


def test_a_new_sequence_holds_what_its_plan_message_says():
    batch = make_batch()
    params = dict(temperature=0.5, top_k=3, seed=9)
    seq = batch.add(new(7, [1, 2, 3, 4, 5, 6], computed=4, generated=2, **params))
    assert (seq.seq_id, seq.num_prompt) == (7, 4)
    assert numbers(seq) == ([1, 2, 3, 4, 5, 6], 4, 2, [])
    assert (seq.params.temperature, seq.params.top_k, seq.params.seed, seq.params.logprobs) == (0.5, 3, 9, None)
    assert seq.num_prompt_logprobs is None and seq.grammar is None
    asks = new(8, [1, 2])
    asks.num_prompt_logprobs = 2
    assert batch.add(asks).num_prompt_logprobs == 2
    assert batch.seqs[7] is seq and batch.seq_id_of_row[seq.row] == 7


def test_rows_are_taken_in_order_reused_after_free_and_grow_past_max_num_seqs():
    batch = make_batch(max_num_seqs=2)
    first = [batch.add(new(i, [i + 1] * (i + 1))) for i in range(5)]  # two rows, then grown twice
    assert [s.row for s in first] == [0, 1, 2, 3, 4]
    assert [numbers(s)[0] for s in first] == [[i + 1] * (i + 1) for i in range(5)]  # kept through the growth
    batch.finish_step(batch.prepare_inputs(batch.begin_step([sched(1, 2, [5]), sched(3, 4, [6])])), [50, 51])
    assert numbers(first[3]) == ([4, 4, 4, 4, 51], 4, 1, [6])
    batch.free([3, 1])
    batch.free([3, 42])  # twice, or never added: an abort may cross a finish
    assert sorted(batch.seqs) == [0, 2, 4]
    again = [batch.add(new(10 + i, [9])) for i in range(3)]
    assert {again[0].row, again[1].row} == {1, 3} and again[2].row == 5  # the freed rows first, then a fresh one
    # Nothing of a row's last owner is left: its tokens, computed count and blocks are the new one's.
    assert numbers(again[0]) == numbers(again[1]) == ([9], 0, 0, [])
    assert batch.seqs_at(np.array([5, again[0].row, 0])) == [again[2], again[0], first[0]]
    batch.clear()
    assert batch.seqs == {}
    assert sorted(batch.add(new(i, [1])).row for i in range(8)) == list(range(8))  # the 8 rows it has: no growth


@pytest.mark.parametrize("message, bad", [
    ("already live", new(1, [1, 2])),
    ("has no tokens", new(2, [])),
    ("at least one must be computed", new(2, [1, 2], computed=2)),
    ("at least one must be computed", new(2, [1, 2], generated=3)),
    ("beyond max_model_len 32", new(2, list(range(33)))),
    ("outside the vocabulary", new(2, [5, 100])),
])
def test_a_sequence_that_cannot_be_live_is_refused(message, bad):
    batch = make_batch()
    batch.add(new(1, [1, 2, 3]))
    with pytest.raises(PlanError, match=message):
        batch.add(bad)
    assert sorted(batch.seqs) == [1]


@pytest.mark.parametrize("message, scheduled", [
    ("scheduled twice", [sched(1, 1, [2]), sched(1, 1)]),
    ("not live on this worker", [sched(1, 1, [2]), sched(9, 1)]),
    ("out of range", [sched(1, 1, [2]), sched(0, 1, [32])]),
    ("sequence 0: cannot compute 5 tokens from 4 of its 5", [sched(1, 1, [2]), sched(0, 5)]),
    ("sequence 0 needs 2 blocks for 5 tokens but its table would have 1", [sched(1, 1, [2]), sched(0, 1, [0])]),
])
def test_a_plan_that_does_not_fit_is_refused_whole(message, scheduled):
    batch = make_batch()
    batch.add(new(0, [1, 2, 3, 4, 5], computed=4))
    batch.add(new(1, [6, 7, 8, 9], computed=3))
    before = [numbers(batch.seqs[i]) for i in (0, 1)]
    with pytest.raises(PlanError, match=message):
        batch.begin_step(scheduled)
    assert [numbers(batch.seqs[i]) for i in (0, 1)] == before  # sequence 1 did not keep block 2


def test_no_sequence_computes_past_max_model_len():
    batch = make_batch(max_model_len=4)
    batch.add(new(0, [1, 2, 3, 4]))
    step = batch.begin_step([sched(0, 4, [3])])
    batch.finish_step(batch.prepare_inputs(step), [5])  # the token after the last position is sampled
    assert batch.seqs[0].token_ids == [1, 2, 3, 4, 5]
    with pytest.raises(PlanError, match="would reach 5 tokens, beyond max_model_len 4"):
        batch.begin_step([sched(0, 1, [4])])


def test_a_mixed_step_flattens_decodes_first_and_its_metadata_says_so():
    batch = make_batch()
    batch.add(new(10, list(range(1, 11))))  # a prompt of 10, prefilled in chunks: 6 tokens now
    batch.add(new(11, [20, 21, 22, 23, 24], computed=4))  # a decode after 4 cached positions
    batch.add(new(12, [30, 31, 32]))  # a fresh prompt, whole
    batch.add(new(13, [40, 41, 42, 43, 44, 45, 46], computed=6))  # a decode, its second block is block 0
    plan = [sched(10, 6, [3, 7]), sched(11, 1, [5, 9]), sched(12, 3, [1]), sched(13, 1, [2, 0])]
    inputs = batch.prepare_inputs(batch.begin_step(plan))
    meta = inputs.meta

    # Decodes first (11, 13), then the rest, each in plan order.
    assert inputs.plan_index.tolist() == [1, 3, 0, 2]
    assert batch.seq_id_of_row[inputs.rows].tolist() == [11, 13, 10, 12]
    assert inputs.input_ids.tolist() == [24, 46, 1, 2, 3, 4, 5, 6, 30, 31, 32]
    assert inputs.positions.tolist() == [4, 6, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    # Slot of position p: table[p // 4] * 4 + p % 4.
    assert meta.slot_mapping.tolist() == [9 * 4, 0 * 4 + 2, 12, 13, 14, 15, 28, 29, 4, 5, 6]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 8, 11]
    assert meta.seq_lens.tolist() == [5, 7, 6, 3] == meta.seq_lens_cpu.tolist()
    assert meta.query_lens_cpu.tolist() == [1, 1, 6, 3]
    assert (meta.max_query_len, meta.num_decodes, meta.block_size) == (6, 2, BLOCK_SIZE)
    tables = meta.block_tables.tolist()
    assert [tables[0], tables[1], tables[2], tables[3][:1]] == [[5, 9], [2, 0], [3, 7], [1]]
    # Every sequence but the unfinished chunk samples, at its last token of the step.
    assert inputs.sampling_index.tolist() == [0, 1, 3]
    assert inputs.logits_indices.tolist() == [0, 1, 10]
    assert batch.seq_id_of_row[inputs.sampling_rows].tolist() == [11, 13, 12]
    assert [s.seq_id for s in batch.seqs_at(inputs.sampling_rows)] == [11, 13, 12]

    batch.finish_step(inputs, [70, 71, 72])
    assert numbers(batch.seqs[11]) == ([20, 21, 22, 23, 24, 70], 5, 1, [5, 9])
    assert numbers(batch.seqs[13]) == ([40, 41, 42, 43, 44, 45, 46, 71], 7, 1, [2, 0])
    assert numbers(batch.seqs[12]) == ([30, 31, 32, 72], 3, 1, [1])
    assert numbers(batch.seqs[10]) == (list(range(1, 11)), 6, 0, [3, 7])  # no token: it did not sample


def test_the_next_step_reads_the_tokens_the_last_one_sampled():
    """Decodes of the tokens the worker appended itself (the scheduler need not know them yet,
    as with --async-scheduling), beside the last chunk of a prompt, which gets a new block."""
    batch = make_batch()
    batch.add(new(10, list(range(1, 11))))
    batch.add(new(11, [20, 21, 22, 23, 24], computed=4))
    first = batch.prepare_inputs(batch.begin_step([sched(10, 6, [3, 7]), sched(11, 1, [5, 9])]))
    batch.finish_step(first, [70])
    inputs = batch.prepare_inputs(batch.begin_step([sched(10, 4, [11]), sched(11, 1)]))
    assert inputs.input_ids.tolist() == [70, 7, 8, 9, 10]
    assert inputs.positions.tolist() == [5, 6, 7, 8, 9]
    assert inputs.meta.slot_mapping.tolist() == [9 * 4 + 1, 30, 31, 44, 45]
    assert inputs.logits_indices.tolist() == [0, 4]  # both sample now
    assert batch.seqs[10].block_table == [3, 7, 11]


def test_a_step_larger_than_the_staging_buffers_grows_them():
    prompt = [(7 * i) % 100 for i in range(300)]  # more tokens than the 256 the buffers start with
    batch = PersistentBatch(BLOCK_SIZE, num_blocks=80, max_model_len=400, vocab_size=100, max_num_seqs=1)
    batch.add(new(0, prompt))
    inputs = batch.prepare_inputs(batch.begin_step([sched(0, 300, list(range(75)))]))
    assert torch.equal(inputs.input_ids, torch.tensor(prompt))
    assert torch.equal(inputs.positions, torch.arange(300))
    assert torch.equal(inputs.meta.slot_mapping, torch.arange(300))  # blocks 0..74 in order
