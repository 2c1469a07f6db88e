"""The plain-Python side of CUDA graphs for decode steps: which batch sizes are captured, which
captured size a step runs as, and how its inputs are padded to that size in persistent buffers.

A graph replays fixed addresses and shapes, so every decode step of n sequences is copied into
buffers allocated once and padded to the next captured size. Padding rows must corrupt nothing:
each is a one-token sequence at position 0 whose K/V are written to, and read back from, slot 0 of
a scratch block that the worker keeps out of the scheduler's pool (the last block of the cache).

Nothing here needs a GPU: tests run it on CPU tensors. Capture and replay are cuda_graphs.py.
"""
import bisect
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.worker.attention import AttentionMetadata

# vLLM's ladder: 1, 2, 4, then every 8 below 256, every 16 from 256 on.
_SMALL_SIZES = (1, 2, 4)
_STEP_BELOW_256, _STEP_FROM_256 = 8, 16


def capture_sizes(max_capture_size: int, max_num_seqs: int) -> list[int]:
    """The decode batch sizes to capture, ascending, up to min(max_capture_size, max_num_seqs);
    that cap itself is always included, so every batch up to it has a graph. [] when the cap < 1."""
    cap = min(max_capture_size, max_num_seqs)
    ladder = [*_SMALL_SIZES, *range(8, 256, _STEP_BELOW_256), *range(256, cap + 1, _STEP_FROM_256)]
    sizes = [s for s in ladder if s <= cap]
    if cap >= 1 and (not sizes or sizes[-1] != cap):
        sizes.append(cap)
    return sizes


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds num_seqs decodes; None when none does (run eager)."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def reserve_scratch_block(num_blocks: int) -> tuple[int, int]:
    """(blocks the scheduler may hand out, the scratch block's id): the last block is kept back
    for padding rows. Raises ValueError when the cache has no block to spare."""
    if num_blocks < 2:
        raise ValueError(f"a KV cache of {num_blocks} block(s) has none to spare as the CUDA graphs' scratch block")
    return num_blocks - 1, num_blocks - 1


@dataclass
class DecodeBuffers:
    """A decode step's inputs at fixed addresses, for max_size sequences of up to max_blocks
    blocks each. Row i is sequence i; every sequence has exactly one query token."""

    input_ids: torch.Tensor  # [max_size] int64
    positions: torch.Tensor  # [max_size] int64
    slot_mapping: torch.Tensor  # [max_size] int64
    block_tables: torch.Tensor  # [max_size, max_blocks] int32
    seq_lens: torch.Tensor  # [max_size] int32
    query_start_loc: torch.Tensor  # [max_size + 1] int32: 0, 1, 2, ... (one token a sequence)
    block_size: int
    scratch_block: int

    @classmethod
    def allocate(cls, max_size: int, max_blocks: int, block_size: int, scratch_block: int, device) -> "DecodeBuffers":
        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        buffers = cls(zeros(max_size, dtype=torch.int64), zeros(max_size, dtype=torch.int64),
                      zeros(max_size, dtype=torch.int64), zeros(max_size, max_blocks, dtype=torch.int32),
                      zeros(max_size, dtype=torch.int32),
                      torch.arange(max_size + 1, dtype=torch.int32, device=device), block_size, scratch_block)
        buffers.pad(0, max_size)  # capture runs on padding rows alone
        return buffers

    def fits(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether a step is all decodes whose block tables fit these buffers' width."""
        num_seqs = len(meta.query_lens_cpu)
        return (meta.num_decodes == num_seqs == len(input_ids) and 0 < num_seqs <= len(self.seq_lens)
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def fill(self, input_ids, positions, meta: AttentionMetadata, size: int) -> None:
        """Copy a decode step of n <= size sequences into rows [0, n) and pad rows [n, size).
        A real row's table columns beyond its own stay stale: the kernel reads no block past
        seq_len."""
        n, width = len(input_ids), meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.pad(n, size)

    def pad(self, start: int, end: int) -> None:
        """Rows [start, end) become one-token sequences at position 0 in the scratch block."""
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = self.scratch_block * self.block_size
        self.block_tables[start:end, 0] = self.scratch_block
        self.seq_lens[start:end] = 1

    def meta(self, size: int) -> AttentionMetadata:
        """The attention metadata of the first `size` rows (views: a graph captured with it reads
        whatever fill() puts there)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1, num_decodes=size, query_lens_cpu=np.ones(size, dtype=np.int64),
            seq_lens_cpu=np.ones(size, dtype=np.int64),  # unknown at capture; the triton backend never reads it
            block_size=self.block_size,
        )
