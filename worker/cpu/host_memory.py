"""glibc malloc settings for the CPU serving path: keep the memory that a step frees for the next.

torch takes CPU tensors from malloc. glibc serves a request over its mmap threshold (128 KiB at
first, raised as such blocks are freed, to 32 MiB at most) with a fresh mapping and returns it on
free, and it gives a freed heap top back to the OS past its trim threshold. A 2048-token prefill
step allocates and frees ~70 MB of activations per layer (q/k/v, gate/up, ...): with the defaults
each step faults in and zeroes many of those pages again (the kernel's clear_page showed in
profiles of prefill steps). No mmap at all (M_MMAP_MAX 0: every block comes from the heap, whatever
its size; glibc still maps memory when the heap cannot grow, and keeps it) and no trimming make a
step reuse the last step's memory: the process keeps its peak heap, which the next step needs
anyway. A threshold alone is not enough: glibc caps it at 32 MiB, and the LM head's logits at
batch 256 are 48 MiB (256 x 49,152 float32): mapped, faulted in (12,288 pages) and unmapped again
every decode step.
Measured on 2 cores, prefill steps of 7 x 290 tokens through ModelRunner: 365,000 page faults per
step (1.5 GB) with glibc's defaults, none with a 32 MiB threshold and no trimming; the steps took
3.96-5.18 s against 4.80-5.81 s (alternating processes, four steps each, twice). Decode steps at
batch 256 of the no-op model: the 32 MiB threshold left 12,289 page faults per step (the logits),
no mmap none.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> str:
    """Applies the settings where the C library is glibc; returns what was done, for the log."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return "malloc left as it is (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return "malloc left as it is (mallopt refused)"
    return "malloc keeps freed memory (no mmap, no trimming)"
