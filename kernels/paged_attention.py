"""Varlen paged attention: prefill chunks and decodes of many sequences in one launch.

Cache layout (K and V alike), as written by `write_kv`:
    [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous.
Position p of sequence b lives at cache[block_tables[b, p // block_size], p % block_size].
block_size must be a power of two. Any such size works: the kernel walks the context in tiles of
TILE_N = max(block_size, 16) positions (16 is the smallest K `tl.dot` accepts for P @ V) and looks
up each position's block in the table, so a tile may span several small blocks.

Work split: one program per (sequence, query tile, kv head). A query tile is BLOCK_Q consecutive
query tokens of one sequence; the program handles them for every query head that shares the kv
head (GQA/MQA), so each K/V tile is loaded once for the whole group. Its rows are
(token, head-in-group) pairs, BLOCK_Q * GROUP_PAD of them, which keeps the `tl.dot` M dimension
at >= 16 even for single-token decodes. The program walks the sequence's context up to the last
position its tile may see, with an online softmax accumulated in fp32.

Sliding window (WINDOW > 0): query position p sees keys p - WINDOW + 1 .. p (transformers'
sliding_window_overlay). A program starts its walk at the first key its first query sees, so the
blocks wholly before the window, which the scheduler may have released, are never read. Soft-capping
(SOFTCAP > 0, Gemma 2): scores become SOFTCAP * tanh(score / SOFTCAP) before the mask.

Split-KV decode (flash-decoding): when a batch of decodes has too few (sequence, kv head) programs
to fill the GPU's SMs, each sequence's context is cut into `num_splits` equal ranges, one program
each; every program writes its unnormalised output with its running max and sum, and a second
kernel combines the splits. The split count depends only on the batch's shape (never on context
lengths), so a captured CUDA graph stays valid for any context.
"""

import functools

import torch
import triton
import triton.language as tl

# Rows per program for prefill tiles, and the floor that keeps tl.dot legal for decodes.
_PREFILL_ROWS = 64
_MIN_ROWS = 16
_MIN_TILE = 16  # the smallest K of tl.dot: the context tile, and the padded head_dim
_MAX_SPLITS = 32  # beyond this the reduction costs more than the extra programs gain
_WAVES = 2  # split until about this many programs per SM


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_out_ptr, part_ml_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_co, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # The grid is sized for the longest query; shorter ones have nothing in their later tiles.
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this step's queries

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = tile * BLOCK_Q + rows // GROUP_PAD  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = ctx_len + tok  # absolute position: attends to keys 0..q_pos

    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q_off = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    # Causality: the tile's last query sees keys up to ctx_len + its index, never beyond.
    kv_end = ctx_len + tl.minimum((tile + 1) * BLOCK_Q, q_len)
    # The window: the tile's first query sees keys from ctx_len + its index - window + 1 on.
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(ctx_len + tile * BLOCK_Q - window + 1, 0)
    # This program's share of the context: all of it, or one of NUM_SPLITS tile-aligned ranges
    # (splits run only for decodes, whose single query sees every key of [kv_start, seq_len)).
    split_len = tl.cdiv(tl.cdiv(kv_end - kv_start, NUM_SPLITS), TILE_N) * TILE_N
    kv_lo = kv_start + split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, kv_end)
    n = tl.arange(0, TILE_N)
    for start in range(kv_lo, kv_hi, TILE_N):
        k_pos = start + n
        # Slots past seq_len in the last block hold stale data (maybe NaN): never load them.
        kv_ok = k_pos < seq_len
        # int64: physical block * block stride overflows int32 on large caches.
        phys = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        slot = phys * stride_cb + (k_pos % BLOCK_SIZE) * stride_co + kv_head * stride_ch
        k_t = tl.load(k_cache_ptr + slot[None, :] + d[:, None], mask=kv_ok[None, :] & d_ok[:, None], other=0.0)

        s = tl.dot(q, k_t, input_precision="ieee") * scale
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf, or is 0).
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        seen = k_pos[None, :] <= q_pos[:, None]
        if HAS_WINDOW:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        # Without a window the range's first key is visible to every row, so m_new is finite from
        # the first tile on; with one, a row's first tiles may all lie before its window: its max
        # stays -inf, and exp is taken against 0 so that no -inf - -inf makes a NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_WINDOW:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_cache_ptr + slot[:, None] + d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    token = q_start + tok
    o_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        if HAS_WINDOW:
            # Padding rows (past the query, or past the group) may see no key of the window:
            # their sum stays 0. They are never stored; 1 spares them a 0 / 0.
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        o_off = token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # Partials are [T, H, NUM_SPLITS, HEAD_DIM_PAD] and [T, H, NUM_SPLITS, 2] (max, sum), fp32.
        # An empty split (its range starts past the context) leaves max -inf and sum 0.
        part = (token * (GROUP * tl.num_programs(2) // NUM_SPLITS) + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    out_ptr, part_out_ptr, part_ml_ptr,
    stride_ot, stride_oh, num_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # One program per (token, query head): rescale each split by exp(its max - the overall max).
    token = tl.program_id(0)
    head = tl.program_id(1)
    part = (token * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(part_ml_ptr + part * 2)
    l_s = tl.load(part_ml_ptr + part * 2 + 1)
    # Split 0 holds the first key the query sees, so the max is finite; a split whose range lies
    # past the context has max -inf (or 0 with a window) and sum 0: its weight multiplies zeros.
    weight = tl.exp(m - tl.max(m, 0))
    d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :])
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_s * weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def _query_tile(max_query_len: int, group_pad: int) -> int:
    """Query tokens per program: fill ~_PREFILL_ROWS rows, but no more tokens than any query has."""
    rows = max(_MIN_ROWS, min(_PREFILL_ROWS, triton.next_power_of_2(max_query_len) * group_pad))
    return max(1, rows // group_pad)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter: no split)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """KV splits per decode sequence: 1 when num_seqs * num_kv_heads programs already fill the
    SMs, else a power of two (<= _MAX_SPLITS) that brings the programs to about _WAVES per SM."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    return min(_MAX_SPLITS, triton.next_power_of_2(triton.cdiv(_WAVES * num_sms, programs)))


def launch_constants(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, max_query_len: int,
                     num_splits: int, has_window: bool = False, has_softcap: bool = False) -> dict[str, int]:
    """The attention kernel's constexprs for a launch of this shape (also what tests compile for
    CUDA ahead of time, so that a shape the GPU would refuse fails on the CPU too)."""
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    return dict(GROUP=group, GROUP_PAD=group_pad,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=max(_MIN_TILE, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size, TILE_N=max(_MIN_TILE, block_size),
                BLOCK_Q=_query_tile(max_query_len, group_pad), NUM_SPLITS=num_splits,
                HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap)


def combine_constants(constants: dict[str, int]) -> dict[str, int]:
    """The split-combining kernel's constexprs, from the attention kernel's."""
    return {k: constants[k] for k in ("HEAD_DIM", "HEAD_DIM_PAD", "NUM_SPLITS")}


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                    max_query_len=None, num_splits=None, window=None, softcap=None):
    """Causal attention of q [T, num_heads, head_dim] over the paged cache; returns [T, H, D].

    block_tables [B, max_blocks] int32, seq_lens [B] int32 (context including this step's tokens),
    query_start_loc [B + 1] int32. max_query_len: the longest query (derived with a device sync
    when None). num_splits: KV splits per sequence for an all-decode batch (max_query_len 1);
    None chooses by the device's SM count (choose_num_splits), 1 turns splitting off, a power of
    two forces it (tests). Raises ValueError when splits are forced on a batch with prefills.
    window: a query at position p sees keys p - window + 1 .. p (None: 0 .. p); table entries of
    blocks wholly before that are never read. softcap: scores become softcap * tanh(score / softcap).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert q.stride(-1) == k_cache.stride(-1) == 1 and block_tables.stride(-1) == 1

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:  # costs a device sync; callers that know it should pass it
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, _num_sms(q.device)) if max_query_len == 1 else 1
    if num_splits & (num_splits - 1) or (num_splits > 1 and max_query_len != 1):
        raise ValueError(f"num_splits={num_splits}: splits are a power of two, for decode-only batches")
    c = launch_constants(num_heads, num_kv_heads, head_dim, block_size, max_query_len, num_splits,
                         has_window=bool(window), has_softcap=bool(softcap))
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, c["HEAD_DIM_PAD"], dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty(num_tokens, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_out = part_ml = out  # never touched
    grid = (num_seqs, triton.cdiv(max_query_len, c["BLOCK_Q"]), num_kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_ml,
        block_tables, seq_lens, query_start_loc,
        scale, window or 0, softcap or 1.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        **c,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_ml, out.stride(0), out.stride(1), num_heads,
            **combine_constants(c),
        )
    return out
