"""RMSNorm (with the residual add before it), the rotary embedding, the KV cache write and SiLU
times up in one pass each (cpu/ops.c), for float32 or bfloat16 on the CPU (bfloat16 computed in
float32 and rounded where torch's bfloat16 ops round). Compiled on first use
(worker/cpu/native.py); where it cannot be, `cpu_ops()` is None and the layers keep their torch code,
which gives the same results.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from pagedserve.worker.cpu import native

SOURCE = Path(__file__).with_name("ops.c")
# No fused multiply-adds: each product and sum rounds where torch's separate ops round it.
FLAGS = [*native.BASE_FLAGS, "-ffp-contract=off"]
_DTYPES = (torch.float32, torch.bfloat16)


class CpuOps:
    def __init__(self, lib: ctypes.CDLL):
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._rms_norm = lib.rms_norm
        self._rms_norm.argtypes = [p, i64, p, p, p, i64, i64, f32]
        self._rms_norm.restype = None
        self._rotary = lib.rotary
        self._rotary.argtypes = [p, i64, i64, i64, i64, p, p]
        self._rotary.restype = None
        self._write_kv = lib.write_kv
        self._write_kv.argtypes = [p, i64, p, i64, p, p, p, i64, i64, i64]
        self._write_kv.restype = None
        self._silu_and_mul = lib.silu_and_mul
        self._silu_and_mul.argtypes = [p, i64, p, i64, i64]
        self._silu_and_mul.restype = None
        # bfloat16 twins, same arguments (uint16_t where the float32 ones take float, the
        # rotation's cos/sin table float32 in both): picked by the tensor's dtype.
        self._bf16 = {}
        for fn in (self._rms_norm, self._rotary, self._silu_and_mul):
            twin = getattr(lib, f"{fn.__name__}_bf16")
            twin.argtypes, twin.restype = fn.argtypes, None
            self._bf16[fn.__name__] = twin

    def _for(self, fn, x: torch.Tensor):
        """fn, or its bfloat16 twin where x is bfloat16."""
        return self._bf16[fn.__name__] if x.dtype == torch.bfloat16 else fn

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm over the last dimension of x (residual + x, given a contiguous residual of x's
        shape, which is updated in place to that sum). x, weight and residual all float32 or all
        bfloat16 (the caller checks: RMSNorm.forward)."""
        dim = x.shape[-1]
        # At one token the Python around the call is most of its cost: a contiguous x (the hidden
        # states) is read as it is, without a reshape.
        rows = x if x.is_contiguous() else x.reshape(-1, dim)  # a view for a row-strided x; a copy otherwise
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        fn = self._bf16["rms_norm"] if x.dtype == torch.bfloat16 else self._rms_norm
        fn(rows.data_ptr(), dim if rows is x else rows.stride(0), 0 if residual is None else residual.data_ptr(),
           weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
        return out

    def rotary(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> bool:
        """Rotates x [T, heads, head_dim] (float32 or bfloat16) in place at positions (int64) by
        cos_sin [max_position, head_dim] (float32, contiguous); False (untouched) where the layouts do
        not suit: x's heads not side by side in each row, positions not contiguous."""
        tokens, heads, head_dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != head_dim or positions.dtype != torch.int64 \
                or not positions.is_contiguous() or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
            return False
        self._for(self._rotary, x)(x.data_ptr(), x.stride(0), tokens, heads, head_dim, positions.data_ptr(),
                                   cos_sin.data_ptr())
        return True

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> bool:
        """k, v [T, kv_heads, head_dim] into contiguous caches [num_blocks, block_size, kv_heads,
        head_dim] at their slots (int64), all float32 or all bfloat16; False (nothing written) where
        the layouts or dtypes do not suit."""
        tokens, kv_heads, head_dim = k.shape
        dtype = k.dtype
        # One chain of plain tests: called once a layer, and at batch 1 the checks cost as much as
        # the copy (sets and generators here took half of it).
        suits = (dtype in _DTYPES and v.dtype == dtype and k_cache.dtype == dtype and v_cache.dtype == dtype
                 and k.stride(2) == 1 and v.stride(2) == 1 and k.stride(1) == head_dim and v.stride(1) == head_dim
                 and k_cache.is_contiguous() and v_cache.is_contiguous()
                 and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous())
        if suits:
            self._write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                           v_cache.data_ptr(), slot_mapping.data_ptr(), tokens, kv_heads * head_dim, k.element_size())
        return suits

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up [T, 2 * inter] (gate's half first; float32 or bfloat16)."""
        gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, inter)
        self._for(self._silu_and_mul, gate_up)(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, inter)
        return out


@functools.cache
def _cpu_ops() -> CpuOps | None:
    lib = native.load(SOURCE, FLAGS, "norms, rotary, KV writes and SiLU use torch")
    return CpuOps(lib) if lib is not None else None


def cpu_ops(x: torch.Tensor) -> CpuOps | None:
    """The compiled ops where they serve x (float32 or bfloat16 on the CPU), else None."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    return _cpu_ops()
