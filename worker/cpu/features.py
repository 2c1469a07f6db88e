"""What this CPU can do, from the kernel's own list (/proc/cpuinfo's `flags`), for the choices that
depend on it: `--dtype auto` (bfloat16 where the CPU computes it natively) and the signature under
which kernel timings are cached (kernel_choices.py).
"""
from __future__ import annotations

import functools
import os
import platform

# AVX-512 BF16 (vdpbf16ps) or AMX's bf16 tiles: oneDNN's bfloat16 matmuls run natively on these
# (vLLM's CPU build keys its bfloat16 support on the same two flags).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def has_native_bf16() -> bool:
    """Whether the CPU has AVX-512 BF16 or AMX-BF16 (BF16_FLAGS)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
