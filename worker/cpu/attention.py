"""The CPU attention kernels (cpu/attention.c: decodes and prefill chunks, straight from the paged
cache), compiled on first use (worker/cpu/native.py) and called through ctypes.

Where there is no compiler, or the build fails, `attention_kernel()` returns None and the torch
attention backend keeps its gather + SDPA path (slower, same results).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from pagedserve.worker.cpu import native

SOURCE = Path(__file__).with_name("attention.c")
# -ffast-math's optimisations one by one, not the flag itself: with it GCC links crtfastmath.o,
# which sets flush-to-zero for the whole process on load (subnormals become 0 in torch and Python
# too; hypothesis refuses to run). These are what lets the softmax loop vectorise and call expf.
FAST_MATH = ["-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros", "-fassociative-math",
             "-freciprocal-math"]
FLAGS = [*native.BASE_FLAGS, *FAST_MATH]


class AttentionKernel:
    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self.decode_fn, self.prefill_fn = lib.paged_decode_attention, lib.paged_prefill_attention
        self.decode_fn.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, f32, i64, f32]
        self.prefill_fn.argtypes = [p, p, p, p, i64, p, p, p, p, i32, i32, i32, i32, i32, f32, i64, f32]
        self.decode_fn.restype = self.prefill_fn.restype = ctypes.c_int

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, out, scale: float, window: int | None = None,
               softcap: float | None = None) -> None:
        """q, out: [B, heads, head_dim] float32 contiguous; caches [num_blocks, block_size, kv_heads,
        head_dim] float32; block_tables [B, max_blocks] int32 with unit last stride; seq_lens [B] int32.
        window: each query sees its last `window` positions, itself included (None: all); blocks
        wholly before that are never read. softcap: scores become softcap * tanh(score / softcap)."""
        _, block_size, kv_heads, head_dim = k_cache.shape
        status = self.decode_fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                block_tables.stride(0), seq_lens.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1],
                                kv_heads, head_dim, block_size, scale, window or 0, softcap or 0.0)
        if status != 0:
            raise MemoryError("paged_decode_attention could not allocate its score buffers")

    def prefill(self, q, k_cache, v_cache, block_tables, seq_lens, query_start, query_lens, out, scale: float,
                window: int | None = None, softcap: float | None = None) -> None:
        """Causal attention of B prefill chunks, their K/V already in the cache: sequence b's
        query_lens[b] rows of q and out ([rows, heads, head_dim], float32 contiguous) from row
        query_start[b] are the last of its seq_lens[b] positions. All per-sequence tensors int32.
        window and softcap as in decode."""
        _, block_size, kv_heads, head_dim = k_cache.shape
        status = self.prefill_fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                 block_tables.stride(0), seq_lens.data_ptr(), query_start.data_ptr(),
                                 query_lens.data_ptr(), out.data_ptr(), seq_lens.shape[0], q.shape[1], kv_heads,
                                 head_dim, block_size, scale, window or 0, softcap or 0.0)
        if status != 0:
            raise MemoryError("paged_prefill_attention could not allocate its score buffers")


@functools.cache
def attention_kernel() -> AttentionKernel | None:
    lib = native.load(SOURCE, FLAGS, "attention uses gather + SDPA")
    return AttentionKernel(lib) if lib is not None else None
