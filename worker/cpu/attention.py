"""The CPU attention kernels (cpu/attention.c: decodes and prefill chunks, straight from the paged
cache, float32 or bfloat16), compiled on first use (worker/cpu/native.py) and called through ctypes.

Where there is no compiler, or the build fails, `attention_kernel()` returns None and the torch
attention backend keeps its gather + SDPA path (slower, same results).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple

import torch

from pagedserve.worker.cpu import native

SOURCE = Path(__file__).with_name("attention.c")
# -ffast-math's optimisations one by one, not the flag itself: with it GCC links crtfastmath.o,
# which sets flush-to-zero for the whole process on load (subnormals become 0 in torch and Python
# too; hypothesis refuses to run). These are what lets the softmax loop vectorise and call expf.
FAST_MATH = ["-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros", "-fassociative-math",
             "-freciprocal-math"]
FLAGS = [*native.BASE_FLAGS, *FAST_MATH]


class DecodeStep(NamedTuple):
    """The decode call's arguments that every layer of a step shares, read off their tensors once
    (AttentionKernel.decode_step, from the backend's prepare()): at batch 1 the per-layer Python of
    slicing the tables and reading their pointers cost about as much as the kernel's own work."""

    block_tables: torch.Tensor  # [B, max_blocks] int32, unit last stride: kept alive for the pointers
    seq_lens: torch.Tensor  # [B] int32
    table_ptr: int
    table_stride: int
    lens_ptr: int
    num_seqs: int
    dtype: torch.dtype  # of q, out and the caches: float32 or bfloat16


class AttentionKernel:
    """q, out and the caches all float32, or all bfloat16 (converted to float32 in the kernel, the
    outputs rounded back to nearest, ties to even)."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self.decode_fn, self.prefill_fn = lib.paged_decode_attention, lib.paged_prefill_attention
        self.decode_fn.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, f32, i64, f32, i32]
        self.prefill_fn.argtypes = [p, p, p, p, i64, p, p, p, p, i32, i32, i32, i32, i32, f32, i64, f32, i32]
        self.decode_fn.restype = self.prefill_fn.restype = ctypes.c_int

    @classmethod
    def is_bf16(cls, q, k_cache, v_cache, out) -> bool:
        """Whether the call takes bfloat16; ValueError where the tensors' dtypes differ or are
        neither float32 nor bfloat16 (the C code would read them as something else)."""
        dtypes = {t.dtype for t in (q, k_cache, v_cache, out)}
        if len(dtypes) != 1 or q.dtype not in cls.DTYPES:
            raise ValueError(f"the CPU attention kernel takes q, out and caches all float32 or all bfloat16, "
                             f"not {sorted(map(str, dtypes))}")
        return q.dtype == torch.bfloat16

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, out, scale: float, window: int | None = None,
               softcap: float | None = None) -> None:
        """q, out: [B, heads, head_dim] contiguous; caches [num_blocks, block_size, kv_heads,
        head_dim]; all float32 or all bfloat16. block_tables [B, max_blocks] int32 with unit last
        stride; seq_lens [B] int32. window: each query sees its last `window` positions, itself
        included (None: all); blocks wholly before that are never read. softcap: scores become
        softcap * tanh(score / softcap)."""
        self.is_bf16(q, k_cache, v_cache, out)
        self.decode_with(self.decode_step(block_tables, seq_lens, q.dtype), q, k_cache, v_cache, out, scale, window,
                         softcap)

    @staticmethod
    def decode_step(block_tables, seq_lens, dtype: torch.dtype) -> DecodeStep:
        """decode's step-wide arguments (block_tables and seq_lens as in decode), once per step."""
        return DecodeStep(block_tables, seq_lens, block_tables.data_ptr(), block_tables.stride(0),
                          seq_lens.data_ptr(), seq_lens.shape[0], dtype)

    def decode_with(self, step: DecodeStep, q, k_cache, v_cache, out, scale: float, window: int | None = None,
                    softcap: float | None = None) -> None:
        """decode for one layer of a prepared step: q, out and the caches as in decode, of
        step.dtype (checked on q and the caches; out is the caller's, made like q); ValueError
        otherwise."""
        if q.dtype != step.dtype or k_cache.dtype != step.dtype or v_cache.dtype != step.dtype:
            self.is_bf16(q, k_cache, v_cache, out)  # raises where they differ
            raise ValueError(f"the step was prepared for {step.dtype}, not {q.dtype}")
        _, block_size, kv_heads, head_dim = k_cache.shape
        status = self.decode_fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), step.table_ptr,
                                step.table_stride, step.lens_ptr, out.data_ptr(), step.num_seqs, q.shape[1],
                                kv_heads, head_dim, block_size, scale, window or 0, softcap or 0.0,
                                step.dtype == torch.bfloat16)
        if status != 0:
            raise MemoryError("paged_decode_attention could not allocate its score buffers")

    def prefill(self, q, k_cache, v_cache, block_tables, seq_lens, query_start, query_lens, out, scale: float,
                window: int | None = None, softcap: float | None = None) -> None:
        """Causal attention of B prefill chunks, their K/V already in the cache: sequence b's
        query_lens[b] rows of q and out ([rows, heads, head_dim], contiguous) from row
        query_start[b] are the last of its seq_lens[b] positions. All per-sequence tensors int32.
        Dtypes, window and softcap as in decode."""
        bf16 = self.is_bf16(q, k_cache, v_cache, out)
        _, block_size, kv_heads, head_dim = k_cache.shape
        status = self.prefill_fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                 block_tables.stride(0), seq_lens.data_ptr(), query_start.data_ptr(),
                                 query_lens.data_ptr(), out.data_ptr(), seq_lens.shape[0], q.shape[1], kv_heads,
                                 head_dim, block_size, scale, window or 0, softcap or 0.0, bf16)
        if status != 0:
            raise MemoryError("paged_prefill_attention could not allocate its score buffers")


@functools.cache
def attention_kernel() -> AttentionKernel | None:
    lib = native.load(SOURCE, FLAGS, "attention uses gather + SDPA")
    return AttentionKernel(lib) if lib is not None else None
