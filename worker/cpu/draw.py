"""The random rows' inverse-CDF draw for float32 weights on the CPU (cpu/draw.c, compiled on first
use by worker/cpu/native.py); None elsewhere or where it cannot be built, and the sampler then draws
with torch ops (worker/sampler.py: draw_from_weights)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from pagedserve.worker.cpu import native

SOURCE = Path(__file__).with_name("draw.c")


@functools.cache
def cpu_draw_rows():
    """draw_rows(weights ptr, rows, n, row stride, uniforms ptr (float64), out ptr (int64)), or None."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.load_function(SOURCE, native.BASE_FLAGS, "the sampler draws with torch ops", "draw_rows",
                                [p, i64, i64, i64, p, p], None)
