"""The CPU attention kernels (worker/cpu/attention.c) against the torch paths they replace
(decodes: gather the blocks, SDPA; prefill chunks: one SDPA call per sequence), on random caches
with scattered blocks: their AVX2 loops (head_dim a multiple of 32) and their plain ones, GQA groups
of 1 to 7, block sizes that do and do not divide the contexts, contexts of a single token, prompts
that are all new or continue a cached prefix, mixed with decodes in one step."""
import pytest
import torch

from pagedserve.worker import attention
from pagedserve.worker.attention import AttentionMetadata, TorchAttention
from pagedserve.worker.cpu.attention import attention_kernel
from tests.helpers.batch import step_inputs

SHAPES = [
    (9, 3, 64, 16),   # SmolLM2's shape: the AVX2 path
    (8, 2, 128, 5),   # two 64-wide halves; blocks that split the contexts unevenly
    (4, 4, 32, 4),    # no GQA, one 32-float chunk per head
    (14, 2, 64, 8),   # groups of 7: V sums three heads, three, then one at a time
    (6, 3, 48, 3),    # plain loops, a head_dim that is no multiple of 32
]


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


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("seq_lens", [
    [1, 2, 7, 33, 64, 130],  # enough sequences for a task per sequence
    [77],                    # one sequence: a task per (sequence, kv head)
])
def test_kernel_matches_gather_and_sdpa(heads, kv_heads, head_dim, block_size, seq_lens):
    kernel = attention_kernel()
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
        outputs.append(backend.forward(q, k, v, cache, backend.prepare(meta), head_dim ** -0.5))
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-6, rtol=1e-5)


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """The library must not switch the process to flush-to-zero (as -ffast-math's crtfastmath.o
    does on load): torch, Python and hypothesis all run in the same process."""
    assert attention_kernel() is not None
    tiny = float.fromhex("0x1p-1070")
    assert tiny * 1.0 != 0.0
    assert torch.tensor([tiny], dtype=torch.float64).mul(1.0).item() != 0.0


def run_step(backend: TorchAttention, work: list[tuple[int, int]], shape, seed: int) -> torch.Tensor:
    """One step through `backend`: (context before the step, new tokens) per sequence, each
    sequence's blocks scattered over a random cache; returns the attention output."""
    heads, kv_heads, head_dim, block_size = shape
    g = torch.Generator().manual_seed(seed)
    widths = [-(-(done + new) // block_size) for done, new in work]
    num_blocks = sum(widths) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    seqs = []
    for (done, new), width in zip(work, widths):
        table, order = order[:width], order[width:]
        seqs.append(([0] * (done + new), done, new, table))
    meta = step_inputs(seqs, block_size, num_blocks).meta
    tokens = sum(new for _, new in work)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) for _ in range(2))
    q = torch.randn(tokens, heads, head_dim, generator=g)
    k, v = (torch.randn(tokens, kv_heads, head_dim, generator=g) for _ in range(2))
    return backend.forward(q, k, v, (k_cache, v_cache), backend.prepare(meta), head_dim ** -0.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("work", [
    [(0, 1), (0, 2), (0, 9), (0, 40), (0, 77)],  # fresh prompts: one position, a partial tile, many tiles
    [(5, 1), (0, 33), (30, 12), (16, 16)],       # a decode, a fresh prompt, chunks continuing cached prefixes
    [(0, 130)],                                  # one sequence: a task per (tile, kv head)
])
def test_prefill_kernel_matches_sdpa(shape, work):
    kernel = attention_kernel()
    assert kernel is not None
    # Run order matters: the decodes' rows come first in the step whichever backend runs it.
    mine = run_step(TorchAttention(kernel), work, shape, seed=sum(shape))
    reference = run_step(TorchAttention(), work, shape, seed=sum(shape))
    torch.testing.assert_close(mine, reference, atol=2e-6, rtol=1e-5)


def test_long_fresh_prompts_stay_with_sdpa(monkeypatch):
    """Past KERNEL_MAX_FRESH_CONTEXT a fresh prompt goes to SDPA (faster there); a chunk that
    continues a cached prefix stays with the kernel; both give the reference result."""
    monkeypatch.setattr(attention, "KERNEL_MAX_FRESH_CONTEXT", 20)
    calls = []
    kernel = attention_kernel()
    real_prefill = kernel.prefill

    class Counting:
        decode = kernel.decode

        def prefill(self, *args):
            calls.append(args[6].tolist())  # query_lens
            real_prefill(*args)

    work, shape = [(0, 8), (0, 30), (40, 30)], SHAPES[0]
    mine = run_step(TorchAttention(Counting()), work, shape, seed=3)
    torch.testing.assert_close(mine, run_step(TorchAttention(), work, shape, seed=3), atol=2e-6, rtol=1e-5)
    assert calls == [[8, 30]]
