"""The CPU decode attention kernel (cpu_attention.c), compiled on first use (worker/native.py) and
called through ctypes.

Where there is no compiler, or the build fails, `decode_kernel()` returns None and the torch
attention backend keeps its gather + SDPA path (slower, same results).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from worker import native

SOURCE = Path(__file__).with_name("cpu_attention.c")
# -ffast-math's optimisations one by one, not the flag itself: with it GCC links crtfastmath.o,
# which sets flush-to-zero for the whole process on load (subnormals become 0 in torch and Python
# too; hypothesis refuses to run). These are what lets the softmax loop vectorise and call expf.
FAST_MATH = ["-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros", "-fassociative-math",
             "-freciprocal-math"]
FLAGS = [*native.BASE_FLAGS, *FAST_MATH]


class DecodeKernel:
    def __init__(self, lib: ctypes.CDLL):
        fn = lib.paged_decode_attention
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        fn.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, f32]
        fn.restype = None
        self.fn = fn

    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, out, scale: float) -> None:
        """q, out: [B, heads, head_dim] float32 contiguous; caches [num_blocks, block_size, kv_heads,
        head_dim] float32; block_tables [B, max_blocks] int32 with unit last stride; seq_lens [B] int32."""
        num_blocks, block_size, kv_heads, head_dim = k_cache.shape
        self.fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                block_tables.stride(0), seq_lens.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], kv_heads,
                head_dim, block_size, scale)


@functools.cache
def decode_kernel() -> DecodeKernel | None:
    lib = native.load(SOURCE, FLAGS, "decodes use gather + SDPA")
    return DecodeKernel(lib) if lib is not None else None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
