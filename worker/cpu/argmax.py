"""Greedy sampling's row argmax for float32 on the CPU (cpu/argmax.c, compiled on first use by
worker/cpu/native.py); elsewhere, or where it cannot be built, torch's argmax, which gives the same
index."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from pagedserve.worker.cpu import native

SOURCE = Path(__file__).with_name("argmax.c")


@functools.cache
def _kernel():
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.load_function(SOURCE, native.BASE_FLAGS, "greedy rows use torch's argmax", "argmax_rows",
                                [p, i64, i64, i64, p], None)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [R, V]: [R] int64, the first of equal maxima, NaN above everything."""
    kernel = _kernel() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if kernel is None or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] == 0:
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    kernel(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out
