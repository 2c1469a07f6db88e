"""Triton kernels against their plain-torch references.

Without CUDA the kernels run under Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET once per @triton.jit decoration, and triton.language's own helpers (tl.max,
tl.sum, tl.cdiv) are decorated when triton is first imported: the variable must be set before
anything in the process imports triton, which is why it is set before any other import here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from pagedserve import kernels  # noqa: E402
from pagedserve.kernels.kv_write import _write_kv_kernel  # noqa: E402
from pagedserve.kernels.paged_attention import _combine_splits_kernel, _paged_attention_kernel, choose_num_splits  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
    # fp32 goes through ieee dots, so it holds the tight bound; half types round P before P @ V.
    DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)]
else:
    DEVICE = "cpu"
    DTYPES = [(torch.float32, 1e-5)]
    # Reloading kernels/ cannot repair this (tl's helpers stay compiled-only): fail loudly.
    if not all(isinstance(f, InterpretedFunction) for f in (tl.max, _paged_attention_kernel)):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; set it in "
                           "tests/conftest.py or run tests/kernels/test_kernels.py in its own process")


def test_interpreter_is_used_on_cpu():
    if DEVICE == "cuda":
        pytest.skip("compiled kernels on CUDA")
    for fn in (_write_kv_kernel, _paged_attention_kernel, _combine_splits_kernel, tl.max, tl.sum, tl.cdiv):
        assert isinstance(fn, InterpretedFunction)


# ---------------------------------------------------------------------------------------- write_kv

@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim",
                         [(16, 1, 64), (32, 4, 128), (16, 3, 80)])
def test_write_kv_matches_reference(block_size, num_kv_heads, head_dim, slot_dtype, dtype, atol):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 6, 29
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens: their slots must stay untouched
    slots = slots.to(DEVICE, slot_dtype)

    caches = [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kernels.write_kv(key, value, *caches, slots)
    kernels.write_kv_reference(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


# --------------------------------------------------------------------------------- paged_attention

# (cached prefix length, new query tokens) per sequence.
MIXED = [(37, 13), (0, 23), (69, 1), (16, 1), (5, 2)]  # chunk on a prefix, full prefill, decodes
DECODE = [(0, 1), (32, 1), (63, 1), (69, 1)]
PREFILL = [(0, 70)]  # one long prefill: several query tiles per sequence


def _build_batch(requests, block_size, num_kv_heads, group, head_dim, dtype, gen):
    """Random q and a cache holding every sequence's full context in shuffled physical blocks."""
    seq_lens = [ctx + q_len for ctx, q_len in requests]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column of padding entries
    num_blocks = sum(blocks_per_seq) + 3  # a few physical blocks no sequence owns
    physical = torch.randperm(num_blocks, generator=gen)
    owned, unowned = physical[: sum(blocks_per_seq)], physical[sum(blocks_per_seq):]

    # Padding entries point at unowned blocks, which (like stale slots) are NaN: any read shows.
    tables = unowned[torch.randint(len(unowned), (len(requests), max_blocks), generator=gen)]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        tables[b, :nb] = owned[used: used + nb]
        used += nb
        slots = tables[b, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        kv = torch.randn(2, n, num_kv_heads, head_dim, generator=gen).to(dtype)
        kernels.write_kv_reference(kv[0], kv[1], k_cache, v_cache, slots)

    q_lens = torch.tensor([q_len for _, q_len in requests])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)])
    q = torch.randn(int(qsl[-1]), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    to = lambda t, dt=None: t.to(DEVICE, dt) if dt else t.to(DEVICE)  # noqa: E731
    return (to(q), to(k_cache), to(v_cache), to(tables, torch.int32),
            to(torch.tensor(seq_lens), torch.int32), to(qsl, torch.int32), int(q_lens.max()))


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("requests", [MIXED, DECODE, PREFILL], ids=["mixed", "decode", "prefill"])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (1, 3), (1, 8), (2, 4)])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (32, 128), (16, 128), (32, 64), (4, 32)])
def test_paged_attention_matches_reference(block_size, head_dim, num_kv_heads, group, requests,
                                           dtype, atol):
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim * 10 + group)
    q, k_cache, v_cache, tables, seq_lens, qsl, max_q = _build_batch(
        requests, block_size, num_kv_heads, group, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    # Passing max_query_len or letting the wrapper derive it must not matter.
    max_query_len = max_q if requests is not MIXED else None
    out = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, max_query_len)
    ref = kernels.paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, qsl, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(ref).all()
    assert (out.float() - ref.float()).abs().max().item() <= atol


def test_paged_attention_odd_head_dim_and_empty_query():
    """head_dim not a power of two, and a sequence with no new tokens in the batch."""
    dtype, atol = DTYPES[0]
    gen = torch.Generator().manual_seed(7)
    q, k_cache, v_cache, tables, seq_lens, qsl, max_q = _build_batch(
        [(20, 3), (9, 0), (40, 1)], 16, 2, 2, 80, dtype, gen)
    out = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.1, max_q)
    ref = kernels.paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, qsl, 0.1)
    assert (out.float() - ref.float()).abs().max().item() <= atol


# ------------------------------------------------------------------------------ split-KV decodes

# Contexts that divide no split size, one shorter than a tile (later splits empty), one of a token.
LONG_DECODES = [(0, 1), (4, 1), (69, 1), (130, 1)]


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("group", [1, 2, 3, 4])
@pytest.mark.parametrize("block_size", [4, 16])  # a tile of 4 blocks, a tile of one
def test_split_kv_decode_matches_reference(block_size, group, num_splits, dtype, atol):
    gen = torch.Generator().manual_seed(block_size * 100 + group * 10 + num_splits)
    q, k_cache, v_cache, tables, seq_lens, qsl, _ = _build_batch(
        LONG_DECODES, block_size, 2, group, 64, dtype, gen)
    out = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125, 1, num_splits=num_splits)
    ref = kernels.paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125)
    assert (out.float() - ref.float()).abs().max().item() <= atol


def test_split_kv_changes_the_summation_not_the_result():
    """Forcing splits really takes the split path (other rounding), and agrees with no split."""
    dtype, atol = DTYPES[0]
    gen = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, tables, seq_lens, qsl, _ = _build_batch([(150, 1)], 16, 1, 4, 64, dtype, gen)
    whole = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125, 1, num_splits=1)
    split = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125, 1, num_splits=4)
    assert not torch.equal(whole, split)
    assert (whole.float() - split.float()).abs().max().item() <= atol


def test_split_kv_is_refused_for_prefills_and_odd_counts():
    gen = torch.Generator().manual_seed(4)
    batch = _build_batch(MIXED, 16, 1, 2, 64, DTYPES[0][0], gen)
    with pytest.raises(ValueError, match="decode-only"):
        kernels.paged_attention(*batch[:6], 0.125, batch[6], num_splits=2)
    decodes = _build_batch(DECODE, 16, 1, 2, 64, DTYPES[0][0], gen)
    with pytest.raises(ValueError, match="power of two"):
        kernels.paged_attention(*decodes[:6], 0.125, 1, num_splits=3)


@pytest.mark.parametrize("num_seqs,num_kv_heads,num_sms,expected", [
    (1, 8, 132, 32),   # one sequence of the 8B shape: capped at 32 splits
    (4, 8, 132, 16),   # 32 programs -> 264 / 32 = 8.25 -> next power of two
    (16, 8, 132, 4),   # 128 programs leave SMs idle: 264 / 128 -> 3 -> 4
    (17, 8, 132, 1),   # 136 programs fill 132 SMs: no split
    (3, 3, 1, 1),      # the interpreter's single "SM": never split
])
def test_choose_num_splits(num_seqs, num_kv_heads, num_sms, expected):
    assert choose_num_splits(num_seqs, num_kv_heads, num_sms) == expected


# ------------------------------------------------------------------ sliding window, soft-capping

def _release_outside_window(tables, seq_lens, qsl, block_size, window, caches):
    """What the scheduler does to a sliding model's table: entries of blocks wholly before the
    first key the step's first query sees point at a block of NaNs (a released block now someone
    else's); the kernel must never read them. Returns the table and the caches with that block."""
    released = tables.clone()
    nan = torch.full_like(caches[0][:1], float("nan"))
    caches = [torch.cat([c, nan]) for c in caches]
    for b in range(len(seq_lens)):
        first_query = int(seq_lens[b]) - int(qsl[b + 1] - qsl[b])
        first_key = max(0, first_query - window + 1)
        released[b, : first_key // block_size] = len(caches[0]) - 1
    return released, caches


@pytest.mark.parametrize("window,softcap", [(8, None), (13, None), (None, 5.0), (8, 3.0), (100, None)])
@pytest.mark.parametrize("requests,num_splits", [(MIXED, 1), (PREFILL, 1), (LONG_DECODES, 1), (LONG_DECODES, 4)],
                         ids=["mixed", "prefill", "decode", "decode_split4"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_window_and_softcap_match_reference(block_size, requests, num_splits, window, softcap):
    """Windows shorter than a tile and than the prefill, one longer than most contexts; a cap small
    enough to change every score; the blocks before the window released (NaN)."""
    dtype, atol = DTYPES[0]
    gen = torch.Generator().manual_seed(block_size + (window or 0) * 7)
    q, k_cache, v_cache, tables, seq_lens, qsl, max_q = _build_batch(requests, block_size, 2, 3, 32, dtype, gen)
    ref = kernels.paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, qsl, 0.2, window=window,
                                            softcap=softcap)
    if softcap or window < max(ctx + n for ctx, n in requests):
        plain = kernels.paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, qsl, 0.2)
        assert not torch.allclose(ref, plain), "the window or the cap should change the result"
    if window:
        tables, (k_cache, v_cache) = _release_outside_window(tables, seq_lens, qsl, block_size, window,
                                                             (k_cache, v_cache))
    out = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.2, max_q, num_splits=num_splits,
                                  window=window, softcap=softcap)
    assert torch.isfinite(ref).all()
    assert (out.float() - ref.float()).abs().max().item() <= atol
