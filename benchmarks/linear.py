"""The linears of a forward pass at SmolLM2's sizes (30 layers of fused q/k/v 960x576, o 576x576,
fused gate/up 3072x576, down 576x1536: 30 distinct weights each, so they stream from memory as
in serving), for several row counts, four ways:

    python benchmarks/linear.py --output linear.json

- `mkl`: nn.Linear (torch's CPU matmul; MKL's sgemm),
- `onednn_packed`: oneDNN with the weight reordered once into its blocked layout,
- `onednn`: oneDNN on the weight as stored (what the worker uses above 128 rows),
- `cpu_linear`: worker/cpu/linear.c (what the worker uses up to 128 rows).

The calls of one row count alternate between the four, rounds apart, and each keeps its fastest
round: on a shared machine that is the best estimate of what the code itself costs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pagedserve.worker.cpu.linear import CpuLinear, PackedLinear, linear_rows, onednn_linear  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer
LAYERS = 30


def ways(weights: list[nn.Linear], kernel) -> dict[str, list]:
    packed = [PackedLinear(w) for w in weights]
    mine = [CpuLinear(w, kernel) for w in weights]
    return {
        "mkl": [lambda x, w=w: F.linear(x, w.weight) for w in weights],
        "onednn_packed": [p.forward for p in packed],
        "onednn": [lambda x, w=w: onednn_linear(x, w.weight, None) for w in weights],
        "cpu_linear": [lambda x, m=m: m.kernel_forward(x) for m in mine],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 2048])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=LAYERS, help="fewer: the weights may fit in the caches")
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--output", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    kernel = linear_rows()
    if kernel is None:
        sys.exit("worker/cpu/linear.c could not be built (no C compiler, or no AVX2)")
    g = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(args.layers):
        for out_f, in_f in SHAPES:
            lin = nn.Linear(in_f, out_f, bias=False)
            lin.weight.data = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
            weights.append(lin)
    calls = ways(weights, kernel)
    rows = []
    print(f"{'rows':>6}" + "".join(f"{name:>16}" for name in calls) + "   (ms per forward pass; GFLOP/s)")
    with torch.inference_mode():
        for m in args.rows:
            inputs = {in_f: torch.randn(m, in_f, generator=g) for _, in_f in SHAPES}
            flops = 2 * m * sum(o * i for o, i in SHAPES) * args.layers
            best = {name: float("inf") for name in calls}
            for _ in range(args.rounds):
                for name, fns in calls.items():
                    start = time.perf_counter()
                    for fn, w in zip(fns, weights):
                        fn(inputs[w.in_features])
                    best[name] = min(best[name], time.perf_counter() - start)
            row = {"rows": m, **{f"{name}_ms": t * 1e3 for name, t in best.items()},
                   **{f"{name}_gflops": flops / t / 1e9 for name, t in best.items()}}
            rows.append(row)
            print(f"{m:>6}" + "".join(f"{best[n] * 1e3:>9.1f} ({flops / best[n] / 1e9:>3.0f})" for n in calls), flush=True)
    result = {"threads": args.num_threads, "rounds": args.rounds, "layers": args.layers, "shapes": SHAPES, "rows": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
