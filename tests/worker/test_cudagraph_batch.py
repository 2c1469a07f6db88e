"""CUDA graphs' plain-Python side on the CPU: the capture-size ladder, the size a step runs as, the
scratch block, the padding of a decode step into persistent buffers, and when graphs are off.
Capture itself needs a GPU (docs/gpu.md)."""
import logging

import pytest
import torch

from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.cuda_graphs import capture_or_eager, graphs_off_reason
from pagedserve.worker.cudagraph_batch import DecodeBuffers, capture_sizes, padded_size, reserve_scratch_block
from tests.helpers.batch import step_inputs

BLOCK_SIZE = 4


def test_capture_sizes_follow_vllms_ladder():
    sizes = capture_sizes(512, 256)
    assert sizes[:5] == [1, 2, 4, 8, 16]
    assert sizes[-2:] == [248, 256] and len(sizes) == 3 + 31 + 1
    big = capture_sizes(512, 1024)
    assert big[big.index(256):][:3] == [256, 272, 288] and big[-1] == 512
    assert all(b - a == 16 for a, b in zip(big[big.index(256):], big[big.index(256) + 1:]))


@pytest.mark.parametrize("max_size,max_num_seqs,last", [(100, 256, [96, 100]), (512, 3, [1, 2, 3]), (1, 8, [1])])
def test_the_cap_itself_is_captured(max_size, max_num_seqs, last):
    sizes = capture_sizes(max_size, max_num_seqs)
    assert sizes[-len(last):] == last and sizes == sorted(set(sizes))


def test_no_sizes_below_one():
    assert capture_sizes(0, 256) == []


@pytest.mark.parametrize("num_seqs,expected", [(1, 1), (3, 4), (5, 8), (9, 16), (256, 256), (257, 272), (513, None)])
def test_a_batch_runs_as_the_next_captured_size(num_seqs, expected):
    assert padded_size(num_seqs, capture_sizes(512, 512)) == expected


def test_the_last_block_is_kept_back_for_padding():
    assert reserve_scratch_block(100) == (99, 99)
    with pytest.raises(ValueError, match="none to spare"):
        reserve_scratch_block(1)


def _decode_step(tables, lengths):
    """A decode step of sequences with the given block tables and context lengths (new token included)."""
    work = [([(7 * i + t) % 50 for t in range(n)], n - 1, 1, table) for i, (table, n) in enumerate(zip(tables, lengths))]
    return step_inputs(work, BLOCK_SIZE, num_blocks=32)


def test_fill_copies_real_rows_and_pads_the_rest_into_the_scratch_block():
    inputs = _decode_step([[3, 5], [7], [9, 2, 4]], [6, 2, 11])
    buffers = DecodeBuffers.allocate(8, 5, BLOCK_SIZE, scratch_block=31, device="cpu")
    buffers.block_tables.fill_(-7)  # stale values from an earlier, wider step
    assert buffers.fits(inputs.input_ids, inputs.meta)
    buffers.fill(inputs.input_ids, inputs.positions, inputs.meta, size=4)

    assert buffers.input_ids[:3].tolist() == inputs.input_ids.tolist()
    assert buffers.positions[:3].tolist() == [5, 1, 10]
    assert buffers.slot_mapping[:3].tolist() == [5 * 4 + 1, 7 * 4 + 1, 4 * 4 + 2]
    assert buffers.block_tables[:3, :3].tolist() == inputs.meta.block_tables.tolist()
    assert buffers.seq_lens[:3].tolist() == [6, 2, 11]
    # Row 3 pads: one token at position 0, written to and read from the scratch block's slot 0.
    assert (buffers.input_ids[3], buffers.positions[3], buffers.seq_lens[3]) == (0, 0, 1)
    assert buffers.slot_mapping[3] == 31 * BLOCK_SIZE and buffers.block_tables[3, 0] == 31

    meta = buffers.meta(4)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4] and meta.num_decodes == 4 and meta.max_query_len == 1
    assert meta.seq_lens.data_ptr() == buffers.seq_lens.data_ptr()  # views: a graph sees each fill


def test_steps_that_no_buffer_serves_are_refused():
    buffers = DecodeBuffers.allocate(2, 2, BLOCK_SIZE, scratch_block=31, device="cpu")
    wide = _decode_step([[1, 2, 3]], [9])  # three blocks: wider than the buffers' tables
    assert not buffers.fits(wide.input_ids, wide.meta)
    many = _decode_step([[1], [2], [3]], [2, 2, 2])  # more sequences than rows
    assert not buffers.fits(many.input_ids, many.meta)
    prefill = step_inputs([([1, 2, 3], 0, 3, [1])], BLOCK_SIZE, num_blocks=32)
    assert not buffers.fits(prefill.input_ids, prefill.meta)


@pytest.mark.parametrize("device,changes,reason", [
    ("cpu", {}, "not on CUDA"),
    ("cuda", {"enforce_eager": True}, "--enforce-eager"),
    ("cuda", {"attention_backend": "torch"}, "torch attention backend"),
    ("cuda", {"world_size": 2}, "tensor parallelism"),
    ("cuda", {"max_cudagraph_capture_size": 0}, "capture-size"),
    ("cuda", {}, None),
])
def test_when_graphs_are_off(device, changes, reason):
    config = WorkerConfig(model="m", **changes)
    backend = "torch" if config.attention_backend == "torch" else "triton"
    got = graphs_off_reason(config, torch.device(device), backend)
    assert got == reason if reason is None else reason in got


def test_a_failed_capture_falls_back_to_eager(caplog):
    class Broken:
        sizes = [1, 2]

        def capture(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="pagedserve.worker.cuda_graphs"):
        assert capture_or_eager(Broken) is None
    assert "serving without graphs" in caplog.text and "stream is capturing" in caplog.text
