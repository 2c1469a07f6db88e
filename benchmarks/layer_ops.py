"""The element-wise parts of a Llama layer, torch against the compiled ops of worker/cpu/ops.c, at
SmolLM2's sizes (hidden 576, 9 query and 3 KV heads of 64, intermediate 1536) for a prefill chunk
(2048 tokens) and a decode batch (64 tokens):

    python benchmarks/layer_ops.py --output layer_ops.json
    python benchmarks/layer_ops.py --dtype bfloat16   # the _bf16 twins against torch in bfloat16

Each row is the median of --iters calls; the last line of each size is what one forward pass of
the 30 layers spends on them (two norms with their residual adds, the q/k rotation, the KV cache
write, SiLU times up per layer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedserve.worker.cpu.ops import _cpu_ops  # noqa: E402
from pagedserve.worker.models.layers import RMSNorm, RotaryEmbedding, apply_rotary  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 576, 9, 3, 64, 1536, 30
PER_LAYER = {"residual add + RMSNorm": 2, "rotary (q and k)": 1, "KV cache write": 1, "SiLU * up": 1}


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cases(tokens: int, ops, dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """name -> (torch call, compiled call) on the layouts the layers hand them."""
    g = torch.Generator().manual_seed(tokens)
    norm = RMSNorm(HIDDEN, 1e-5).to(dtype)
    x, residual = (torch.randn(tokens, HIDDEN, generator=g).to(dtype) for _ in range(2))
    rotary = RotaryEmbedding(HEAD_DIM, 8192, {"rope_theta": 100000.0, "rope_type": "default"})
    rotary.build(torch.device("cpu"))
    positions = torch.randint(0, 8192, (tokens,), generator=g)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    q, k, v = (t.view(tokens, -1, HEAD_DIM) for t in qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                                                KV_HEADS * HEAD_DIM], dim=-1))
    cache = torch.zeros(8192, 16, KV_HEADS, HEAD_DIM, dtype=dtype)
    slots = torch.randperm(cache.shape[0] * 16, generator=g)[:tokens]
    gate_up = torch.randn(tokens, 2 * INTER, generator=g).to(dtype)

    def torch_rotary():
        cos, sin = (t.unsqueeze(1) for t in rotary.cos_sin[positions].to(dtype).chunk(2, dim=-1))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def torch_kv_write():
        cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, k)
        cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, v)

    def torch_silu():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    return {
        "residual add + RMSNorm": (lambda: norm.normalize(residual + x),
                                   lambda: ops.rms_norm(x, norm.weight, norm.eps, residual)),
        "rotary (q and k)": (torch_rotary, lambda: (ops.rotary(q, positions, rotary.cos_sin),
                                                    ops.rotary(k, positions, rotary.cos_sin))),
        "KV cache write": (torch_kv_write, lambda: ops.write_kv(k, v, cache, cache, slots)),
        "SiLU * up": (torch_silu, lambda: ops.silu_and_mul(gate_up)),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 64])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--output", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    ops = _cpu_ops()
    if ops is None:
        sys.exit("the compiled ops could not be built (no C compiler?)")
    rows = []
    print(f"{'tokens':>6}  {'op':<24}{'torch ms':>10}{'compiled ms':>13}{'speedup':>9}")
    for tokens in args.tokens:
        step = {"torch": 0.0, "compiled": 0.0}
        for name, (torch_fn, compiled_fn) in cases(tokens, ops, getattr(torch, args.dtype)).items():
            t, c = median_ms(torch_fn, args.iters), median_ms(compiled_fn, args.iters)
            rows.append({"tokens": tokens, "op": name, "torch_ms": t, "compiled_ms": c})
            step["torch"] += t * PER_LAYER[name] * LAYERS
            step["compiled"] += c * PER_LAYER[name] * LAYERS
            print(f"{tokens:>6}  {name:<24}{t:>10.3f}{c:>13.3f}{t / c:>8.1f}x")
        rows.append({"tokens": tokens, "op": f"per forward pass ({LAYERS} layers)", "torch_ms": step["torch"],
                     "compiled_ms": step["compiled"]})
        print(f"{tokens:>6}  {'per forward pass':<24}{step['torch']:>10.1f}{step['compiled']:>13.1f}"
              f"{step['torch'] / step['compiled']:>8.1f}x")
    result = {"threads": args.num_threads, "dtype": args.dtype, "iters": args.iters, "rows": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
