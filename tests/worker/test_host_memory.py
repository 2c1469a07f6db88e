"""worker/cpu/host_memory.py: with its malloc settings a step's freed activations serve the next step
without new page faults; with glibc's defaults they go back to the OS and fault in again."""
import subprocess
import sys
from pathlib import Path

# A "step" allocates four 25 MiB blocks (activations of a 2048-token prefill are that size) and a
# 48 MiB one (a decode step's logits at batch 256 and vocab 49,152), touches them, frees them all;
# the third step's page faults are printed.
STEP = """
import ctypes, resource, sys
from pagedserve.worker.cpu.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sizes = [25 << 20] * 4 + [48 << 20]
    blocks = [libc.malloc(size) for size in sizes]
    for b, size in zip(blocks, sizes):
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print([step() for _ in range(3)][-1])
"""


def third_step_faults(mode: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120).stdout.split("\n")
    return int(out[-2]), out[0]


def test_a_step_reuses_the_memory_the_last_step_freed():
    default, _ = third_step_faults("default")
    kept, said = third_step_faults("keep")
    assert said == "malloc keeps freed memory (1024 MiB mmap threshold, no trimming)"
    assert default > 30_000  # 148 MiB is 37,888 pages: glibc returned them, they fault in again
    assert kept < 100
