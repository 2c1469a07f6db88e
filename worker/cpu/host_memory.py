"""glibc malloc settings for the CPU serving path: keep the memory that a step frees for the next.

torch takes CPU tensors from malloc. glibc serves a request over its mmap threshold (128 KiB at
first, raised as such blocks are freed, to 32 MiB at most) with a fresh mapping and returns it on
free, and it gives a freed heap top back to the OS past its trim threshold. A 2048-token prefill
step allocates and frees ~70 MB of activations per layer (q/k/v, gate/up, ...): with the defaults
each step faults in and zeroes many of those pages again (the kernel's clear_page showed in
profiles of prefill steps). A fixed threshold and no trimming make a step reuse the last step's
memory: the process keeps its peak heap, which the next step needs anyway. The threshold is 1 GiB
where glibc takes it (2.36 does, though its manual says 32 MiB is the most), else 32 MiB: a decode
step's logits are larger than 32 MiB from batch 171 at vocab 49,152 (48 MiB at 256, 148 MiB at
151,936), and a fresh mapping of 48 MiB cost ~25 ms of page faults per allocation on 2 cores, about
as much as the LM head's arithmetic (benchmarks/sampler.py's notes). Only the main thread's heap
(brk) grows past 64 MiB: the worker runs its steps there.
Measured on 2 cores, prefill steps of 7 x 290 tokens through ModelRunner: 365,000 page faults per
step (1.5 GB) with glibc's defaults, none with a 32 MiB threshold and no trimming; the steps took
3.96-5.18 s against 4.80-5.81 s (alternating processes, four steps each, twice). Decode steps at
batch 256 of the no-op model: the 32 MiB threshold left 12,289 page faults per step (the logits),
the 1 GiB threshold none.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # tried in order; the second is glibc's documented ceiling
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> str:
    """Applies the settings where the C library is glibc; returns what was done, for the log."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return "malloc left as it is (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = next((t for t in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, t) == 1), None)
    if threshold is None or mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return "malloc left as it is (mallopt refused)"
    return f"malloc keeps freed memory ({threshold >> 20} MiB mmap threshold, no trimming)"
