"""Scatter the K/V of new tokens into their slots of the paged cache.

Cache layout (K and V alike): [num_blocks, block_size, num_kv_heads, head_dim]. Token slot
`s = block_id * block_size + offset` lives at cache[block_id, offset]. A slot < 0 marks a padding
token that must not be written.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,
    block_size,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: it moves all of that token's heads at once.
    t = tl.program_id(0)
    # int64 because block_id * stride_cb overflows int32 for caches of a few GiB.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // block_size
    offset = slot % block_size

    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = block_id * stride_cb + offset * stride_co + h * stride_ch + d
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write key/value [T, num_kv_heads, head_dim] into k_cache/v_cache in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
    # The kernel addresses head_dim with unit stride.
    assert key.stride(-1) == value.stride(-1) == k_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
