"""C sources of the CPU serving path, compiled on first use with the system's C compiler and
loaded through ctypes.

A C file rather than a torch C++ extension: it builds in about a second (torch's headers take a
minute), and it needs nothing from torch but data pointers. It is built with -fopenmp and loaded
after torch, so its `omp parallel` runs on torch's own OpenMP runtime (same soname, already
loaded) and thread count. A library is cached under a name that hashes the source, the flags and
the CPU, so an image moved to another CPU builds its own.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BASE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
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


def build(source: Path, flags: list[str], compiler: str) -> Path:
    # The headers beside the source (bf16.h) are part of what is built: a change to one rebuilds.
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([compiler, *flags, *LIBS]).encode()
                         + cpu_signature().encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        # Built under a temporary name and renamed: workers starting together never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(source), "-o", tmp, *LIBS], check=True, capture_output=True, text=True,
                           timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def load(source: Path, flags: list[str], what: str) -> ctypes.CDLL | None:
    """The compiled library, or None (logged, with `what` the caller falls back to) where there is
    no compiler or the build fails."""
    compiler = os.environ.get("CC", "cc")
    try:
        return ctypes.CDLL(str(build(source, flags, compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("%s unavailable (%s): %s", source.name, detail, what)
        return None


def load_function(source: Path, flags: list[str], what: str, name: str, argtypes: list, restype):
    """One C function of `source`'s library, typed, or None where `load` gives no library."""
    lib = load(source, flags, what)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn
