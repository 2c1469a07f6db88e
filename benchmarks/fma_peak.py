"""How far the matmuls are from what the cores can do: the float32 FMA ceiling (fma_peak.c, AVX2
+ FMA, nothing from memory) on 1 and on every thread, next to torch's matmul of two square
matrices (oneDNN/MKL) and worker/cpu/linear.c at a decode size (64 rows, SmolLM2's gate/up):

    python benchmarks/fma_peak.py --output fma_peak.json

Each figure is the fastest of --rounds runs (the VM's neighbours only ever slow a run down).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pagedserve.worker.cpu import native  # noqa: E402
from pagedserve.worker.cpu.linear import CpuLinear, linear_rows  # noqa: E402

SOURCE = Path(__file__).with_name("fma_peak.c")
FLOPS_PER_ROUND = 10 * 8 * 2  # ten 8-wide FMAs


def fma_gflops(lib, threads: int, iters: int, rounds: int) -> float:
    sink = ctypes.c_float()
    best = min(lib.fma_seconds(iters, threads, ctypes.byref(sink)) for _ in range(rounds))
    return iters * threads * FLOPS_PER_ROUND / best / 1e9


def best_seconds(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=50_000_000, help="FMA rounds per thread")
    p.add_argument("--size", type=int, default=2048, help="side of the square matmul")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()

    lib = native.load(SOURCE, native.BASE_FLAGS, "no FMA ceiling")
    if lib is None:
        sys.exit("fma_peak.c did not build (needs a C compiler with AVX2 and FMA)")
    lib.fma_seconds.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    lib.fma_seconds.restype = ctypes.c_double
    threads = torch.get_num_threads()
    ceiling_name = f"FMA ceiling, {threads} threads"
    rows = {"FMA ceiling, 1 thread": fma_gflops(lib, 1, args.iters, args.rounds),
            ceiling_name: fma_gflops(lib, threads, args.iters, args.rounds)}
    n = args.size
    a, b = torch.randn(n, n), torch.randn(n, n)
    rows[f"torch matmul {n}x{n}x{n}"] = 2 * n ** 3 / best_seconds(lambda: a @ b, args.rounds) / 1e9
    if linear_rows() is not None:
        layer = CpuLinear(torch.nn.Linear(576, 3072, bias=False), linear_rows())
        x = torch.randn(64, 576)
        rows["cpu/linear.c, 64 x 576 -> 3072"] = 2 * 64 * 576 * 3072 / best_seconds(lambda: layer(x), args.rounds) / 1e9
    ceiling = rows[ceiling_name]
    print(f"{'':40s} {'GFLOP/s':>8s} {'of ceiling':>10s}")
    for name, gflops in rows.items():
        print(f"{name:40s} {gflops:8.1f} {gflops / ceiling:10.0%}")
    if args.output:
        args.output.write_text(json.dumps({"threads": threads, "gflops": rows}, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
