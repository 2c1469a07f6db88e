"""What one layer's attention costs at batch 1, where the call's overhead is most of it: the torch
backend's forward (KV write + C decode kernel) for one decode of SmolLM2's shape (9 heads, 3 KV
heads, head_dim 64, blocks of 16) against its parts alone:

    python benchmarks/attention_call.py --context 256 --dtype bfloat16

Rows: `forward` (TorchAttention.forward, metadata prepared once as the worker does per step),
`write_kv` (the compiled KV write alone), `kernel` (AttentionKernel.decode on ready tensors), and
`bare_call` (the ctypes call with every argument already a Python int: the kernel's own time plus
ctypes), and `30_layers` (forward over --layers layers' own caches in turn, as a step reads them,
per layer: their K/V no longer all in L2). Fastest of --rounds rounds of --iters calls each, in
microseconds: on a shared machine the fastest is the better estimate."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pagedserve.entrypoints.bench.kernels import RandomStep  # noqa: E402
from pagedserve.worker.attention import make_attention_backend  # noqa: E402
from pagedserve.worker.cpu.ops import cpu_ops  # noqa: E402


def fastest_us(fn, rounds: int, iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e6


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    shape = SimpleNamespace(num_kv_heads=3, num_heads=9, head_dim=64, block_size=16, seed=0)
    dtype, device = getattr(torch, args.dtype), torch.device("cpu")
    step = RandomStep(args.batch, args.context, 1, shape, device, dtype)
    backend = make_attention_backend("torch", device, shape.block_size)
    if backend.kernel is None:
        sys.exit("the C attention kernel could not be built (no C compiler?)")
    meta = backend.prepare(step.meta, dtype)
    caches = (step.k_cache, step.v_cache)
    out = torch.empty_like(step.q)
    ops = cpu_ops(step.k_new)
    kernel = backend.kernel
    q, tables, lens = step.q, meta.block_tables[: args.batch], meta.seq_lens[: args.batch]
    ptrs = [q.data_ptr(), step.k_cache.data_ptr(), step.v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
            lens.data_ptr(), out.data_ptr(), args.batch, 9, 3, 64, 16, step.scale, 0, 0.0, int(dtype == torch.bfloat16)]
    layers = [(torch.empty_like(step.k_cache).copy_(step.k_cache), torch.empty_like(step.v_cache).copy_(step.v_cache))
              for _ in range(args.layers)]

    def all_layers():
        for layer in layers:
            backend.forward(step.q, step.k_new, step.v_new, layer, meta, step.scale)

    runs = {
        "forward": lambda: backend.forward(step.q, step.k_new, step.v_new, caches, meta, step.scale),
        "write_kv": lambda: ops.write_kv(step.k_new, step.v_new, *caches, meta.slot_mapping),
        "kernel": lambda: kernel.decode(q, *caches, tables, lens, out, step.scale),
        "bare_call": lambda: kernel.decode_fn(*ptrs),
    }
    result = {name: fastest_us(fn, args.rounds, args.iters) for name, fn in runs.items()}
    result[f"{args.layers}_layers"] = fastest_us(all_layers, max(1, args.rounds // 10), 1) / args.layers
    kv_bytes = 2 * args.batch * args.context * 3 * 64 * dtype.itemsize
    print(f"batch {args.batch}, context {args.context}, {args.dtype}, {args.num_threads} threads, "
          f"K/V read {kv_bytes / 1e3:.0f} kB a layer")
    for name, us in result.items():
        print(f"  {name:<10}{us:>8.1f} us")
    return result


if __name__ == "__main__":
    main()
