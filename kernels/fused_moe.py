"""Fused mixture-of-experts for CUDA: the experts of one MoE layer as two grouped GEMM launches over
the (token, expert) pairs sorted by expert (the approach of vLLM's fused_moe and of MegaBlocks;
written here from the idea, not their code).

1. `align` (torch, no host sync, so CUDA graphs can capture it): the T * top_k pairs sorted by
   expert, each expert's run padded to a multiple of BLOCK_M with an invalid pair id
   (T * top_k), and, per BLOCK_M rows, the expert they belong to (-1 past the last run).
2. `_moe_gate_up_kernel`, one launch: each program takes BLOCK_M pair rows of one expert and
   BLOCK_N intermediate columns, gathers the rows' tokens from x [T, H], multiplies by the
   expert's gate and up rows (gate_up [E, 2I, H]) in fp32 and stores silu(gate) * up in
   act [T * top_k, I] at each pair's row: an expert's weights are read once per BLOCK_M of its
   pairs, and an expert without pairs has no program with work.
3. `_moe_down_kernel`, one launch: the same over act [T * top_k, I] and down [E, H, I], each
   row scaled by its routing weight in fp32, stored at its pair's row of out [T * top_k, H].
4. out.view(T, top_k, H).sum(1): the top_k rows of a token, added.

Weights scale in fp32 before the output's rounding (Mixtral's order; Qwen's routers round the
weight to the model dtype first: a difference in the last bit of half-precision outputs).
"""
import torch
import triton
import triton.language as tl

_MIN_BLOCK = 16  # the smallest M, N and K tl.dot accepts


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_pairs, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_at,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    w_expert = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_gate = tl.load(w_expert + n[None, :] * stride_wn + k[:, None], mask=w_mask, other=0.0)  # [K, N]
        w_up = tl.load(w_expert + (n[None, :] + inter) * stride_wn + k[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision="ieee")
        acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
    # Rounded to the activations' dtype first, as the unfused linear's output would be.
    gate = acc_gate.to(act_ptr.dtype.element_ty).to(tl.float32)
    up = acc_up.to(act_ptr.dtype.element_ty).to(tl.float32)
    h = gate / (1.0 + tl.exp(-gate)) * up
    out = act_ptr + pairs.to(tl.int64)[:, None] * stride_at + n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr, w_ptr, out_ptr, weights_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_pairs, inter, hidden,
    stride_at, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = pairs.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    w_expert = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < inter
        a = tl.load(act_ptr + rows[:, None] * stride_at + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_expert + n[None, :] * stride_wn + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    # Rounded like the unfused linear's output, then scaled in fp32.
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    out = out_ptr + rows[:, None] * stride_ot + n[None, :]
    tl.store(out, (acc * scale[:, None]).to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def block_sizes(num_pairs: int, hidden: int, inter: int) -> dict[str, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for a launch: small M tiles when few pairs reach each expert
    (decode), larger once there are many (prefill); N and K within the dims, >= 16 for tl.dot."""
    block_m = 16 if num_pairs <= 512 else 64
    block_n = max(_MIN_BLOCK, min(64, triton.next_power_of_2(min(hidden, inter))))
    block_k = max(_MIN_BLOCK, min(64, triton.next_power_of_2(min(hidden, inter))))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, top_k] -> (sorted_pairs int32 [P], block_expert int32 [P / block_m]).

    sorted_pairs: the flat pair ids t * top_k + j grouped by expert (token order within each),
    each expert's run padded to a multiple of block_m with T * top_k (invalid); P is the bound
    T * top_k + E * (block_m - 1) rounded up to block_m, so nothing waits on the device.
    block_expert[b]: the expert of rows b * block_m ... (b + 1) * block_m - 1, -1 if none."""
    flat = ids.reshape(-1).long()
    num_pairs = flat.numel()
    order = torch.sort(flat, stable=True).indices
    # scatter_add, not bincount: bincount reads the largest id back to the host (a sync that a
    # CUDA graph capture refuses).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    experts_sorted = flat[order]
    rank_in_run = torch.arange(num_pairs, device=ids.device) - start[experts_sorted]
    bound = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_pairs = torch.full((bound,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[padded_start[experts_sorted] + rank_in_run] = order.to(torch.int32)
    block_starts = torch.arange(0, bound, block_m, device=ids.device)
    padded_end = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each token's top-k SiLU-gated experts.

    x [T, H]; gate_up [E, 2I, H] (gate rows, then up rows, per expert); down [E, H, I];
    weights [T, k] (any float dtype, applied in fp32); ids [T, k] int. Returns [T, H] in x's dtype.
    Raises AssertionError on mismatched shapes or a non-unit inner stride."""
    T, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    top_k = ids.shape[1]
    assert gate_up.shape[2] == hidden and down.shape == (num_experts, hidden, inter)
    assert weights.shape == ids.shape and ids.shape[0] == T
    assert x.stride(-1) == gate_up.stride(-1) == down.stride(-1) == 1
    num_pairs = T * top_k
    if T == 0:
        return torch.zeros_like(x)
    blocks = block_sizes(num_pairs, hidden, inter)
    sorted_pairs, block_expert = align(ids, num_experts, blocks["BLOCK_M"])
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    flat_weights = weights.reshape(-1).contiguous()
    grid = (block_expert.numel(), triton.cdiv(inter, blocks["BLOCK_N"]))
    _moe_gate_up_kernel[grid](
        x, gate_up, act, sorted_pairs, block_expert, num_pairs, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0), TOP_K=top_k, **blocks)
    grid = (block_expert.numel(), triton.cdiv(hidden, blocks["BLOCK_N"]))
    _moe_down_kernel[grid](
        act, down, out, flat_weights, sorted_pairs, block_expert, num_pairs, inter, hidden,
        act.stride(0), down.stride(0), down.stride(1), out.stride(0), **blocks)
    return out.view(T, top_k, hidden).sum(1)


def fused_moe_reference(x, gate_up, down, weights, ids) -> torch.Tensor:
    """The same in plain torch, pair by pair with each pair's expert weights gathered (memory
    T * k * 3 * I * H: tests only). Shapes as fused_moe."""
    T, k = ids.shape
    inter = down.shape[2]
    rows = x.repeat_interleave(k, 0).float()  # [T * k, H], pair order
    flat = ids.reshape(-1)
    gate_up_rows = torch.einsum("ph,pnh->pn", rows, gate_up[flat].float())
    gate, up = gate_up_rows[:, :inter], gate_up_rows[:, inter:]
    act = torch.nn.functional.silu(gate) * up
    out = torch.einsum("pi,phi->ph", act, down[flat].float()) * weights.reshape(-1, 1).float()
    return out.view(T, k, -1).sum(1).to(x.dtype)
