"""The CPU decode attention kernel (worker/cpu_attention.c) against the torch path it replaces
(gather the blocks, SDPA), on random caches with scattered blocks: its AVX2 loops (head_dim a
multiple of 32) and its plain ones, GQA groups of 1 to 7, block sizes that do and do not divide the
contexts, contexts of a single token."""
import pytest
import torch

from worker.attention import AttentionMetadata, TorchAttention
from worker.cpu_attention import decode_kernel


def decode_metadata(seq_lens: list[int], block_size: int, num_blocks: int, g: torch.Generator) -> AttentionMetadata:
    width = max(-(-n // block_size) for n in seq_lens)
    table = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * width].view(len(seq_lens), width).to(torch.int32)
    slots = torch.tensor([int(table[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(seq_lens)])
    return AttentionMetadata(
        slot_mapping=slots, block_tables=table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32), max_query_len=1,
        num_decodes=len(seq_lens), query_lens_cpu=[1] * len(seq_lens), seq_lens_cpu=list(seq_lens),
        block_size=block_size)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),   # SmolLM2's shape: the AVX2 path
    (8, 2, 128, 5),   # two 64-wide halves; blocks that split the contexts unevenly
    (4, 4, 32, 4),    # no GQA, one 32-float chunk per head
    (14, 2, 64, 8),   # groups of 7: V sums three heads, three, then one at a time
    (6, 3, 48, 3),    # plain loops, a head_dim that is no multiple of 32
])
@pytest.mark.parametrize("seq_lens", [
    [1, 2, 7, 33, 64, 130],  # enough sequences for a task per sequence
    [77],                    # one sequence: a task per (sequence, kv head)
])
def test_kernel_matches_gather_and_sdpa(heads, kv_heads, head_dim, block_size, seq_lens):
    kernel = decode_kernel()
    assert kernel is not None, "the C compiler should build the kernel on this machine"
    g = torch.Generator().manual_seed(heads * head_dim + block_size)
    num_blocks = 400
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) for _ in range(2)]
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)
    k, v = (torch.randn(len(seq_lens), kv_heads, head_dim, generator=g) for _ in range(2))
    outputs = []
    for backend in (TorchAttention(kernel), TorchAttention()):
        meta = decode_metadata(seq_lens, block_size, num_blocks, torch.Generator().manual_seed(1))
        cache = tuple(c.clone() for c in caches)
        backend.prepare(meta)
        outputs.append(backend.forward(q, k, v, cache, meta, head_dim ** -0.5))
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-6, rtol=1e-5)


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """The library must not switch the process to flush-to-zero (as -ffast-math's crtfastmath.o
    does on load): torch, Python and hypothesis all run in the same process."""
    assert decode_kernel() is not None
    tiny = float.fromhex("0x1p-1070")
    assert tiny * 1.0 != 0.0
    assert torch.tensor([tiny], dtype=torch.float64).mul(1.0).item() != 0.0
