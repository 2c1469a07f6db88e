"""Segmented gather matrix-vector products for batched LoRA, in the style of Punica's SGMV (Chen et
al. 2023, "Punica: Multi-Tenant LoRA Serving"): a step's tokens come in segments, each a run of
rows that share one adapter slot; the LoRA term of row t in segment s is B[slot_s] @ (A[slot_s] @ x_t).

Two kernels, as Punica's shrink and expand: `_shrink` v [T, R] = x @ A[slot]^T (R small: the
adapter's rank, times the sections of a fused linear), `_expand` y [T, out] = v @ B[slot]^T. A
program takes BLOCK_M rows of one segment, so every row of the batch reads only its own adapter
and base-model rows (in no segment) cost nothing. Slots are stacked: A [S, R, in], B [S, out, R].
Accumulation in float32; v is kept in float32 between the two.
"""
import torch
import triton
import triton.language as tl

_MIN_BLOCK = 16  # the smallest M, N and K tl.dot accepts


@triton.jit
def _shrink(x_ptr, a_ptr, v_ptr, seg_start_ptr, seg_end_ptr, seg_slot_ptr,
            in_features, rank,
            stride_xt, stride_as, stride_ar, stride_vt,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    seg, tile = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(seg_start_ptr + seg), tl.load(seg_end_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rows = start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if start + tile * BLOCK_M >= end:
        return
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + k[None, :],
                    mask=(rows[:, None] < end) & (k[None, :] < in_features), other=0.0)
        a = tl.load(a_ptr + slot * stride_as + r[None, :] * stride_ar + k[:, None],
                    mask=(r[None, :] < rank) & (k[:, None] < in_features), other=0.0)  # A^T tile [K, R]
        acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
    tl.store(v_ptr + rows[:, None].to(tl.int64) * stride_vt + r[None, :], acc,
             mask=(rows[:, None] < end) & (r[None, :] < rank))


@triton.jit
def _expand(v_ptr, b_ptr, y_ptr, seg_start_ptr, seg_end_ptr, seg_slot_ptr,
            out_features, rank,
            stride_vt, stride_bs, stride_bn, stride_yt,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    seg, tile, col = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = tl.load(seg_start_ptr + seg), tl.load(seg_end_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rows = start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if start + tile * BLOCK_M >= end:
        return
    r = tl.arange(0, BLOCK_R)
    n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vt + r[None, :],
                mask=(rows[:, None] < end) & (r[None, :] < rank), other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + n[None, :].to(tl.int64) * stride_bn + r[:, None],
                mask=(n[None, :] < out_features) & (r[:, None] < rank), other=0.0)  # B^T tile [R, N]
    y = tl.dot(v, b.to(tl.float32), input_precision="ieee")
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_yt + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < end) & (n[None, :] < out_features))


def block_sizes(rank: int, max_seg_len: int) -> dict:
    """Tiles: BLOCK_R the whole (padded) rank, BLOCK_M rows of a segment (16 for decodes, more for
    prefill segments), K and N tiles of 64."""
    return dict(BLOCK_M=max(_MIN_BLOCK, min(64, triton.next_power_of_2(max(max_seg_len, 1)))),
                BLOCK_R=max(_MIN_BLOCK, triton.next_power_of_2(rank)))


def sgmv_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor,
              seg_slot: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """The LoRA term [T, out] of x [T, in] (x.dtype) for slots a [S, R, in], b [S, out, R]; rows
    in segment i (seg_start[i] <= t < seg_end[i], int32 [G]) use slot seg_slot[i], rows in no
    segment get zeros."""
    T, in_features = x.shape
    _, out_features, rank = b.shape
    assert a.shape[1:] == (rank, in_features) and x.stride(-1) == a.stride(-1) == b.stride(-1) == 1
    y = torch.zeros(T, out_features, dtype=x.dtype, device=x.device)
    groups = seg_start.shape[0]
    if groups == 0 or T == 0:
        return y
    v = torch.empty(T, rank, dtype=torch.float32, device=x.device)
    blocks = block_sizes(rank, max_seg_len)
    tiles = triton.cdiv(max_seg_len, blocks["BLOCK_M"])
    _shrink[(groups, tiles)](x, a, v, seg_start, seg_end, seg_slot, in_features, rank,
                             x.stride(0), a.stride(0), a.stride(1), v.stride(0), BLOCK_K=64, **blocks)
    _expand[(groups, tiles, triton.cdiv(out_features, 64))](
        v, b, y, seg_start, seg_end, seg_slot, out_features, rank,
        v.stride(0), b.stride(0), b.stride(1), y.stride(0), BLOCK_N=64, **blocks)
    return y


def sgmv_lora_reference(x, a, b, seg_start, seg_end, seg_slot) -> torch.Tensor:
    """The same in plain torch, segment by segment (the kernels' judge), in float32."""
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32, device=x.device)
    for start, end, slot in zip(seg_start.tolist(), seg_end.tolist(), seg_slot.tolist()):
        y[start:end] = (x[start:end].float() @ a[slot].float().t()) @ b[slot].float().t()
    return y.to(x.dtype)
