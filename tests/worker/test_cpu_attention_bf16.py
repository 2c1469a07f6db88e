"""The CPU attention kernels (worker/cpu/attention.c) with a bfloat16 cache, q and out: they compute
in float32 on the converted values, so their output must be the float32 kernel's on the same
(bfloat16-representable) inputs rounded to bfloat16 as torch rounds, bit for bit, and within one
bfloat16 ulp (+ 2e-5) of a float64 reference. Decodes, fresh prompts and chunks continuing a cached
prefix in one step, GQA, block sizes 3 to 16, the AVX2 loops and the plain ones, sliding windows (the blocks
before each window released and filled with NaN, never read) and softcap."""
import pytest
import torch

from pagedserve.worker import attention
from pagedserve.worker.attention import TorchAttention
from pagedserve.worker.cpu.attention import attention_kernel
from tests.helpers.attention_reference import paged_reference
from tests.helpers.batch import scattered_step, step_inputs

SHAPES = [  # heads, kv_heads, head_dim, block_size
    (9, 3, 64, 16),   # SmolLM2's shape: the AVX2 loops
    (8, 2, 128, 5),   # blocks that split the contexts unevenly
    (14, 2, 64, 8),   # groups of 7
    (6, 3, 48, 3),    # plain loops: head_dim no multiple of 32
]
WORKS = [
    [(40, 1), (7, 1), (0, 9), (30, 12), (0, 45), (19, 33)],  # decodes, fresh prompts, continued chunks
    [(100, 1)] * 6,                                          # decodes alone: a task per sequence
    [(0, 70)],                                               # one prompt: a task per (tile, kv head)
]


def bf16_values(*shape, g):
    """Random float32 values that bfloat16 holds exactly."""
    return torch.randn(*shape, generator=g).to(torch.bfloat16).float()


def make_step(work, shape, seed, window):
    """One step's float32 inputs, bfloat16-representable, each sequence's blocks scattered; the
    cache as the step leaves it (its new K/V written) for the reference; the tables and metadata,
    with the blocks wholly before each sequence's first window pointed at a NaN block."""
    heads, kv_heads, head_dim, block_size = shape
    g = torch.Generator().manual_seed(seed)
    # one spare block, the last: what released entries point at
    inputs, tables, num_blocks = scattered_step(work, block_size, 1, g, spares_last=True)
    meta = inputs.meta
    caches = [bf16_values(num_blocks, block_size, kv_heads, head_dim, g=g) for _ in range(2)]
    tokens = sum(new for _, new in work)
    q = bf16_values(tokens, heads, head_dim, g=g)
    k, v = (bf16_values(tokens, kv_heads, head_dim, g=g) for _ in range(2))
    for cache, new in zip(caches, (k, v)):
        cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, new)
    rows = sorted(range(len(work)), key=lambda i: work[i][1] != 1)  # decodes first, as the batch orders them
    if window:
        for row, i in enumerate(rows):
            meta.block_tables[row, : max(0, work[i][0] - window + 1) // block_size] = num_blocks - 1
        caches[0][-1] = caches[1][-1] = float("nan")
    return q, k, v, caches, meta, [tables[i] for i in rows], [work[i] for i in rows]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values (8 significant bits) at |x|, float64."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("work", WORKS)
@pytest.mark.parametrize("window,softcap", [(None, None), (11, None), (None, 4.0), (16, 2.5)])
def test_bf16_kernel_is_the_float32_kernel_rounded(monkeypatch, shape, work, window, softcap):
    monkeypatch.setattr(attention, "KERNEL_MAX_FRESH_CONTEXT", 10 ** 6)  # every prompt to the kernel
    kernel = attention_kernel()
    assert kernel is not None, "the C compiler should build the kernel on this machine"
    q, k, v, caches, meta, tables, ordered = make_step(work, shape, sum(shape) + (window or 0), window)
    scale = shape[2] ** -0.5
    backend = TorchAttention(kernel)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        step_meta = backend.prepare(meta, dtype)
        assert step_meta.use_kernel and not step_meta.sdpa_chunks
        cache = tuple(c.to(dtype) for c in caches)
        outputs[dtype] = backend.forward(q.to(dtype), k.to(dtype), v.to(dtype), cache, step_meta, scale, window,
                                         softcap)
    mine = outputs[torch.bfloat16]
    assert mine.dtype == torch.bfloat16
    assert torch.equal(mine, outputs[torch.float32].to(torch.bfloat16))
    expected = paged_reference(q, caches, tables, ordered, scale, window, softcap, torch.float64)
    error = (mine.double() - expected).abs()
    # Half an ulp of rounding to bfloat16 and float32's own error, which is relative to the sums of
    # unit-sized terms rather than to an output that cancels near 0: one ulp, plus the float32
    # tests' atol (test_cpu_attention.py).
    bound = bf16_ulp(expected) + 2e-5
    assert bool((error <= bound).all()), f"worst {float((error / bound).max()):.2f} of the bound"


def test_bf16_rounding_is_torchs_to_nearest_even():
    """A two-token context with zero keys: each row weighs exactly 1/2, so the output is the mean of
    two bfloat16 V rows, exact in float32 and often halfway between two bfloat16 values; the
    kernel must round it as torch does (to nearest, ties to the even one)."""
    kernel = attention_kernel()
    head_dim, g = 64, torch.Generator().manual_seed(5)
    v = (1 + torch.randint(0, 128, (2, head_dim), generator=g) / 128).to(torch.bfloat16)  # [1, 2): 1/128 apart
    v_cache = v.view(1, 2, 1, head_dim)
    k_cache = torch.zeros_like(v_cache)
    mean = (v[0].float() + v[1].float()) / 2
    ties = (mean.view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 8 and (~ties).sum() > 8  # both kinds are checked
    out = torch.empty(1, 1, head_dim, dtype=torch.bfloat16)
    args = (torch.zeros(1, 1, dtype=torch.int32), torch.full((1,), 2, dtype=torch.int32))
    kernel.decode(torch.ones(1, 1, head_dim, dtype=torch.bfloat16), k_cache, v_cache, *args, out, 1.0)
    assert torch.equal(out.view(-1), mean.to(torch.bfloat16))
    # Ties went to an even last bit, whichever way that is.
    assert not bool((out.view(-1)[ties].view(torch.int16) & 1).any())


def test_bf16_kernel_rejects_mixed_dtypes():
    kernel = attention_kernel()
    cache = torch.zeros(2, 4, 1, 32, dtype=torch.bfloat16)
    args = (torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        kernel.decode(torch.zeros(1, 1, 32), cache, cache, *args, torch.zeros(1, 1, 32), 1.0)
    half = cache.half()
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        kernel.decode(half[0, :1], half, half, *args, half[0, :1].clone(), 1.0)


def test_float16_caches_keep_the_sdpa_path():
    meta = step_inputs([([0] * 5, 4, 1, [0])], 16, 2).meta
    assert not TorchAttention(attention_kernel()).prepare(meta, torch.float16).use_kernel
    assert TorchAttention(attention_kernel()).prepare(meta, torch.bfloat16).use_kernel
