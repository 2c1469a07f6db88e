"""Plain-torch twins of the Triton kernels: slow, obviously correct, used as test oracles."""

import torch


def write_kv_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Same contract as pagedserve.kernels.kv_write.write_kv."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = key[keep]
    v_cache[slots // block_size, slots % block_size] = value[keep]


def paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                              max_query_len=None, window=None, softcap=None):
    """Same contract as pagedserve.kernels.paged_attention.paged_attention (max_query_len is unused).
    Reads every block of a sequence's table, released or not, and masks what the window hides."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len, q_len = int(seq_lens[b]), end - start
        if q_len == 0:
            continue
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.float().repeat_interleave(group, dim=1)

        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos[:, None]
        if window:
            visible &= k_pos > q_pos[:, None] - window
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
