"""Paged attention in plain torch, the reference of the attention kernels' tests."""
from __future__ import annotations

import torch


def paged_reference(q, caches, tables, work, scale: float, window: int | None, softcap: float | None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each sequence's rows of q [T, heads, head_dim] attended over its whole context in its
    blocks of caches (K, V [num_blocks, block_size, kv_heads, head_dim]): causal, within the window
    (key > query - window, transformers' sliding_window_overlay), scores soft-capped as
    softcap * tanh(score / softcap). work: (context before the step, new tokens) per sequence, in
    q's row order; tables: their block ids. Computed in `dtype` (default q's)."""
    dtype = dtype or q.dtype
    kv_heads, head_dim = caches[0].shape[2:]
    out, row = torch.empty_like(q, dtype=dtype), 0
    for (done, new), table in zip(work, tables):
        ctx = done + new
        k, v = (c[table].reshape(-1, kv_heads, head_dim)[:ctx].to(dtype).repeat_interleave(q.shape[1] // kv_heads, 1)
                for c in caches)
        scores = torch.einsum("qhd,khd->hqk", q[row:row + new].to(dtype), k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos, k_pos = torch.arange(done, ctx)[:, None], torch.arange(ctx)[None, :]
        seen = (k_pos <= q_pos) & (k_pos > q_pos - (window or ctx + 1))
        out[row:row + new] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v)
        row += new
    return out
