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
from tests.helpers.attention_reference import paged_reference
from tests.helpers.batch import scattered_step

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
    inputs, _, num_blocks = scattered_step(work, block_size, 3, g)
    meta = inputs.meta
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


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]])
@pytest.mark.parametrize("window,softcap", [(5, None), (16, None), (None, 4.0), (11, 2.5)])
@pytest.mark.parametrize("with_kernel", [True, False])
def test_window_and_softcap(monkeypatch, shape, window, softcap, with_kernel):
    """Decodes, chunks continuing a prefix and fresh prompts (some past KERNEL_MAX_FRESH_CONTEXT,
    so SDPA serves them beside the kernel), with the blocks wholly before each step's first window
    released: for the C kernel they hold NaN (never read), for the SDPA fallback, which gathers
    them, another sequence's finite values (masked)."""
    monkeypatch.setattr(attention, "KERNEL_MAX_FRESH_CONTEXT", 20)
    kernel = attention_kernel() if with_kernel else None
    heads, kv_heads, head_dim, block_size = shape
    work = [(40, 1), (7, 1), (0, 9), (30, 12), (0, 45), (19, 33)]
    g = torch.Generator().manual_seed(sum(shape) + (window or 0))
    # one spare block, the last: what released entries point at
    inputs, tables, num_blocks = scattered_step(work, block_size, 1, g, spares_last=True)
    meta = inputs.meta
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) for _ in range(2)]
    tokens = sum(new for _, new in work)
    q = torch.randn(tokens, heads, head_dim, generator=g)
    k, v = (torch.randn(tokens, kv_heads, head_dim, generator=g) for _ in range(2))
    # The cache as the step leaves it (the new K/V written), for the reference.
    for cache, new in zip(caches, (k, v)):
        cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, new)
    rows = sorted(range(len(work)), key=lambda i: work[i][1] != 1)  # decodes first, as the batch orders them
    expected = paged_reference(q, caches, [tables[i] for i in rows], [work[i] for i in rows], head_dim ** -0.5,
                               window, softcap)
    if window:
        for row, i in enumerate(rows):
            meta.block_tables[row, : max(0, work[i][0] - window + 1) // block_size] = num_blocks - 1
        caches[0][-1] = caches[1][-1] = float("nan") if with_kernel else 7.0
    backend = TorchAttention(kernel)
    out = backend.forward(q, k, v, tuple(caches), backend.prepare(meta), head_dim ** -0.5, window, softcap)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("work", [[(255, 1)], [(40, 1), (7, 1), (0, 9), (30, 12)]])
def test_prepared_decode_call_gives_the_kernels_bits(dtype, work):
    """forward's decodes go through the step's prepared arguments (DecodeStep, built once in
    prepare()): the same bits as AttentionKernel.decode on the sliced tensors, for q a strided view
    of a fused qkv output as the layers hand it, at batch 1 and beside prefill chunks."""
    kernel = attention_kernel()
    heads, kv_heads, head_dim, block_size = SHAPES[0]
    g = torch.Generator().manual_seed(len(work))
    inputs, _, num_blocks = scattered_step(work, block_size, 2, g)
    meta = inputs.meta
    tokens, nd = sum(new for _, new in work), meta.num_decodes
    caches = tuple(torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                kv_heads * head_dim], dim=-1))
    backend = TorchAttention(kernel)
    prepared = backend.prepare(meta, dtype)
    assert prepared.decode_step is not None and prepared.decode_step.num_seqs == nd
    out = backend.forward(q, k, v, caches, prepared, head_dim ** -0.5)
    expected = torch.empty(nd, heads, head_dim, dtype=dtype)  # the cache now holds this step's K/V
    kernel.decode(q[:nd].contiguous(), *caches, meta.block_tables[:nd], meta.seq_lens[:nd], expected, head_dim ** -0.5)
    assert torch.equal(out[:nd], expected)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(ValueError, match="prepared for"):
        kernel.decode_with(prepared.decode_step, *(t.to(other) for t in (q[:nd].contiguous(), *caches, expected)),
                           head_dim ** -0.5)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        kernel.decode_with(prepared.decode_step, q[:nd].contiguous(), *(c.half() for c in caches), expected, 1.0)
