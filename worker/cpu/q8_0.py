"""The Q8_0 x Q8_0 dot-product linear of the CPU path (cpu/q8_0.c, compiled on first use as
cpu/native.py does): y = x W^T for a few rows, W as a GGUF file's Q8_0 blocks (int8 codes and a
float32 scale per 32 weights of a row), x quantized per 32 to int8 the same way inside the call.

`kernel()` is this CPU's build (-march=native: VNNI where the CPU has it, else AVX2, else scalar);
`Q8_0Kernel.built(flags)` builds another (the tests build an AVX2-only and a scalar copy).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from pagedserve.worker.cpu import native

SOURCE = Path(__file__).with_name("q8_0.c")
BLOCK = 32  # Q8_0's block length


class Q8_0Kernel:
    """The functions of one build of cpu/q8_0.c (a loaded library)."""

    @classmethod
    def built(cls, flags: list[str]) -> "Q8_0Kernel":
        """A build with these compiler flags; raises OSError (or a SubprocessError) where it does
        not build or load."""
        return cls(ctypes.CDLL(str(native.build(SOURCE, flags, os.environ.get("CC", "cc")))))

    def __init__(self, lib: ctypes.CDLL):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._linear = lib.q8_0_linear
        self._linear.argtypes, self._linear.restype = [p, i64, i64, p, p, i64, p], ctypes.c_int
        self._q4_linear = lib.q4_linear
        self._q4_linear.argtypes, self._q4_linear.restype = [p, i64, i64, p, p, p, i64, p], ctypes.c_int
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
        check(status, "q8_0_linear", k)
        return y

    def q4_linear(self, x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """x float32 [M, K], 4-bit weight w = d * q + m a block of 32 (`pack_q4`'s packed uint8
        [N, K/2], d and m float32 [N, K/32]) -> y float32 [M, N], y[r, n] = sum_b d[n, b] d_x[r, b]
        (q[n, b] . q_x[r, b]) + m[n, b] d_x[r, b] sum(q_x[r, b]), (q_x, d_x) = `quantize(x)`."""
        x = x.contiguous()
        rows, k = x.shape
        y = torch.empty(rows, packed.shape[0], dtype=torch.float32)
        status = self._q4_linear(x.data_ptr(), rows, k, packed.data_ptr(), d.data_ptr(), m.data_ptr(), packed.shape[0],
                                 y.data_ptr())
        check(status, "q4_linear", k)
        return y

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 [M, K] -> codes int8 [M, K], scales float32 [M, K/32] as the kernel quantizes
        its activation (Q8_0: d = max |x| / 127 a block, q = round-half-even(x / d))."""
        x = x.contiguous()
        m, k = x.shape
        q, d = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // BLOCK, dtype=torch.float32)
        self._quantize(x.data_ptr(), m, k, q.data_ptr(), d.data_ptr())
        return q, d


def check(status: int, name: str, k: int) -> None:
    if status == -1:
        raise MemoryError(f"{name} could not allocate the quantized activation")
    if status != 0:
        raise ValueError(f"{name}: K = {k} is no multiple of {BLOCK}")


@functools.cache
def pair_order(k: int) -> torch.Tensor:
    """The order q4_linear reads a row's K 4-bit codes in (cpu/q8_0.c: pairs of blocks): position p
    of a pair is weight (p >> 3) * 4 + (p & 3) of its block (p >> 2) & 1; a last, unpaired block
    keeps its order. Long [K]: codes[:, pair_order(K)] are the codes in positions."""
    p = torch.arange(2 * BLOCK)
    within = ((p >> 2) & 1) * BLOCK + (p >> 3) * 4 + (p & 3)
    pairs = k // (2 * BLOCK)
    order = (torch.arange(pairs)[:, None] * 2 * BLOCK + within).reshape(-1)
    return torch.cat([order, torch.arange(pairs * 2 * BLOCK, k)])


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] in [0, 16) -> uint8 [N, K/2] as q4_linear reads them: in `pair_order`,
    a pair's byte j holding position j (low nibble) and j + 32 (high); a last, unpaired block as
    ggml's Q4_0 (byte j: weight j, and weight j + 16 in the high nibble)."""
    n, k = codes.shape
    positions = codes.to(torch.uint8)[:, pair_order(k)]
    paired = k // (2 * BLOCK) * 2 * BLOCK
    pairs = positions[:, :paired].reshape(n, -1, 2, BLOCK)
    last = positions[:, paired:].reshape(n, -1, 2, BLOCK // 2)
    return torch.cat([(pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, -1),
                      (last[:, :, 0] | (last[:, :, 1] << 4)).reshape(n, -1)], dim=1).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_q4`'s inverse: uint8 [N, K/2] -> codes uint8 [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    paired = k // (2 * BLOCK) * 2 * BLOCK
    pairs = packed[:, :paired // 2].reshape(n, -1, BLOCK)
    last = packed[:, paired // 2:].reshape(n, -1, BLOCK // 2)
    positions = torch.cat([torch.cat([pairs & 0x0F, pairs >> 4], dim=-1).reshape(n, -1),
                           torch.cat([last & 0x0F, last >> 4], dim=-1).reshape(n, -1)], dim=1)
    codes = torch.empty_like(positions)
    codes[:, pair_order(k)] = positions
    return codes


@functools.cache
def kernel() -> Q8_0Kernel | None:
    """This CPU's build, or None (logged) where it cannot be built: the Q8_0 linears then keep
    torch's int8 op."""
    lib = native.load(SOURCE, native.BASE_FLAGS, "Q8_0 linears use torch's int8 op")
    return Q8_0Kernel(lib) if lib is not None else None
