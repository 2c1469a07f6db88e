"""The Q8_0 x Q8_0 dot-product linear of the CPU path (cpu/q8_0.c, compiled on first use as
cpu/native.py does): y = x W^T for a few rows, W as a GGUF file's Q8_0 blocks (int8 codes and a
float32 scale per 32 weights of a row), x quantized per 32 to int8 the same way inside the call.

`kernel()` is this CPU's build (-march=native: VNNI where the CPU has it, else AVX2, else scalar);
`Q8_0Kernel(flags)` builds another (the tests build an AVX2-only and a scalar copy).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

from pagedserve.worker.cpu import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q8_0.c")
BLOCK = 32  # Q8_0's block length


class Q8_0Kernel:
    """The functions of one build of cpu/q8_0.c; raises OSError (or a SubprocessError) where it
    does not build or load."""

    def __init__(self, flags: list[str]):
        lib = ctypes.CDLL(str(native.build(SOURCE, flags, os.environ.get("CC", "cc"))))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._linear = lib.q8_0_linear
        self._linear.argtypes, self._linear.restype = [p, i64, i64, p, p, i64, p], ctypes.c_int
        self._quantize = lib.q8_0_quantize_rows
        self._quantize.argtypes, self._quantize.restype = [p, i64, i64, p, p], None
        lib.q8_0_path.restype = ctypes.c_char_p
        self.path = lib.q8_0_path().decode()  # "avx512vnni", "avxvnni", "avx2" or "scalar"

    def linear(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x float32 [M, K] (K a multiple of 32), codes int8 [N, K], scales float32 [N, K/32] ->
        y float32 [M, N], y[m, n] = sum_b scales[n, b] * d_x[m, b] * (codes[n, b] . q_x[m, b]),
        with (q_x, d_x) = `quantize(x)`. Raises MemoryError where the kernel cannot allocate."""
        x = x.contiguous()
        m, k = x.shape
        y = torch.empty(m, codes.shape[0], dtype=torch.float32)
        status = self._linear(x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), codes.shape[0], y.data_ptr())
        if status != 0:
            raise MemoryError("q8_0_linear could not allocate the quantized activation") if status == -1 else \
                ValueError(f"q8_0_linear: K = {k} is no multiple of {BLOCK}")
        return y

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 [M, K] -> codes int8 [M, K], scales float32 [M, K/32] as the kernel quantizes
        its activation (Q8_0: d = max |x| / 127 a block, q = round-half-even(x / d))."""
        x = x.contiguous()
        m, k = x.shape
        q, d = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // BLOCK, dtype=torch.float32)
        self._quantize(x.data_ptr(), m, k, q.data_ptr(), d.data_ptr())
        return q, d


@functools.cache
def kernel() -> Q8_0Kernel | None:
    """This CPU's build, or None (logged) where it cannot be built: the Q8_0 linears then keep
    torch's int8 op."""
    try:
        return Q8_0Kernel(native.BASE_FLAGS)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("q8_0.c unavailable (%s): Q8_0 linears use torch's int8 op", getattr(e, "stderr", "") or e)
        return None
