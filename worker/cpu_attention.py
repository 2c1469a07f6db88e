"""The CPU decode attention kernel (cpu_attention.c), compiled on first use and called through ctypes.

A C file and the system's C compiler rather than a torch C++ extension: it builds in about a
second (torch's headers take a minute), and it needs nothing from torch but data pointers. It is
built with -fopenmp and loaded after torch, so its `omp parallel` runs on torch's own OpenMP
runtime (same soname, already loaded) and thread count. The library is cached under a name that
hashes the source, the flags and the CPU, so an image moved to another CPU builds its own.

Where there is no compiler, or the build fails, `decode_kernel()` returns None and the torch
attention backend keeps its gather + SDPA path (slower, same results).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
# -ffast-math's optimisations one by one, not the flag itself: with it GCC links crtfastmath.o,
# which sets flush-to-zero for the whole process on load (subnormals become 0 in torch and Python
# too; hypothesis refuses to run). These are what lets the softmax loop vectorise and call expf.
FAST_MATH = ["-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros",
             "-fassociative-math", "-freciprocal-math"]
FLAGS = ["-O3", "-march=native", *FAST_MATH, "-fopenmp", "-fPIC", "-shared"]
LIBS = ["-lm"]  # with libmvec: the vectorised expf


def cache_dir() -> Path:
    base = os.environ.get("PAGEDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagedserve")
    path = Path(base)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:  # a read-only home (containers): the temp dir will do
        return Path(tempfile.gettempdir())


def cpu_signature() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def build(compiler: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, *LIBS]).encode() + cpu_signature().encode())
    target = cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        # Built under a temporary name and renamed: workers starting together never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], check=True, capture_output=True, text=True,
                           timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


class DecodeKernel:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        fn = self.lib.paged_decode_attention
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
    compiler = os.environ.get("CC", "cc")
    try:
        return DecodeKernel(build(compiler))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("CPU decode attention kernel unavailable (%s): decodes use gather + SDPA", detail)
        return None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
