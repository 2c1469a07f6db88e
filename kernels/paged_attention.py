"""Varlen paged attention: prefill chunks and decodes of many sequences in one launch.

Cache layout (K and V alike), as written by `write_kv`:
    [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous.
Position p of sequence b lives at cache[block_tables[b, p // block_size], p % block_size].
block_size must be a power of two (it is the KV tile of the kernel); on a GPU also >= 16, the
smallest tile `tl.dot` accepts.

Work split: one program per (sequence, query tile, kv head). A query tile is BLOCK_Q consecutive
query tokens of one sequence; the program handles them for every query head that shares the kv
head (GQA/MQA), so each K/V block is loaded once for the whole group. Its rows are
(token, head-in-group) pairs, BLOCK_Q * GROUP_PAD of them, which keeps the `tl.dot` M dimension
at >= 16 even for single-token decodes. The program walks the sequence's KV blocks up to the
last position its tile may see, with an online softmax accumulated in fp32.
"""

import torch
import triton
import triton.language as tl

# Rows per program for prefill tiles, and the floor that keeps tl.dot legal for decodes.
_PREFILL_ROWS = 64
_MIN_ROWS = 16


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_co, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)

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
    last_tok = tl.minimum((tile + 1) * BLOCK_Q, q_len)
    num_blocks = tl.cdiv(ctx_len + last_tok, BLOCK_SIZE)
    n = tl.arange(0, BLOCK_SIZE)
    for j in range(0, num_blocks):
        # int64: physical block * block stride overflows int32 on large caches.
        phys = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + n
        # Slots past seq_len in the last block hold stale data (maybe NaN): never load them.
        kv_ok = k_pos < seq_len
        kv_base = k_cache_ptr + phys * stride_cb + kv_head * stride_ch
        kt_off = n[None, :] * stride_co + d[:, None]
        k_t = tl.load(kv_base + kt_off, mask=kv_ok[None, :] & d_ok[:, None], other=0.0)

        s = tl.dot(q, k_t, input_precision="ieee") * scale
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
        # Key 0 is visible to every row, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v_off = n[:, None] * stride_co + d[None, :]
        v_base = v_cache_ptr + phys * stride_cb + kv_head * stride_ch
        v = tl.load(v_base + v_off, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    o_off = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    o_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def _query_tile(max_query_len: int, group_pad: int) -> int:
    """Query tokens per program: fill ~_PREFILL_ROWS rows, but no more tokens than any query has."""
    rows = max(_MIN_ROWS, min(_PREFILL_ROWS, triton.next_power_of_2(max_query_len) * group_pad))
    return max(1, rows // group_pad)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                    max_query_len=None):
    """Causal attention of q [T, num_heads, head_dim] over the paged cache; returns [T, H, D]."""
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
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = _query_tile(max_query_len, group_pad)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, seq_lens, query_start_loc,
        scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q,
    )
    return out
