"""bfloat16 against float32 linears on the CPU, at SmolLM2-135M's shapes (30 layers of fused
q/k/v 960x576, o 576x576, fused gate/up 3072x576, down 576x1536, and the 49152x576 LM head), for
1, 8, 64 and 512 rows, five ways:

    python benchmarks/bf16_linear.py [--rows 1 8 64 512] [--rounds 5] [--num-threads 1] [--output out.json]

- `fp32_F.linear`: torch's float32 matmul (MKL),
- `fp32_ours`: what the worker serves in float32 (worker/cpu/linear.py: cpu/linear.c or F.linear
  per shape at few rows, oneDNN above 128 rows),
- `bf16_F.linear`: F.linear on bfloat16 weight and input,
- `bf16_onednn_packed`: oneDNN's linear on the bfloat16 weight reordered once
  (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, PackedLinear), which reaches AMX,
- `bf16_onednn`: the same op on the weight as stored.

Calls of one row count alternate between the ways, round after round; each way's median round is
reported (ms for the whole forward pass's linears), so a shared machine's load hits all alike.
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
from torch import nn  # noqa: E402

from pagedserve.worker.cpu.linear import PackedLinear, onednn_linear, prepare_linears  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer
HEAD = (49152, 576)


def ways(weights: list[torch.Tensor]) -> dict[str, list]:
    fp32 = nn.Sequential(*(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights))
    for linear, w in zip(fp32, weights):
        linear.weight.data = w
    prepare_linears(fp32)
    bf16 = [w.bfloat16() for w in weights]
    packed = [PackedLinear(nn.Linear(w.shape[1], w.shape[0], bias=False).bfloat16().requires_grad_(False))
              for w in weights]
    for p, w in zip(packed, bf16):
        p.packed = torch.ops.mkldnn._reorder_linear_weight(w)
    return {
        "fp32_F.linear": [lambda x, w=w: F.linear(x, w) for w in weights],
        "fp32_ours": list(fp32),
        "bf16_F.linear": [lambda x, w=w: F.linear(x.bfloat16(), w) for w in bf16],
        "bf16_onednn_packed": [lambda x, p=p: p(x.bfloat16()) for p in packed],
        "bf16_onednn": [lambda x, w=w: onednn_linear(x.bfloat16(), w, None) for w in bf16],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--output", default=None, help="write the table here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers + [HEAD]
    weights = [torch.randn(n, k, generator=g) * k ** -0.5 for n, k in shapes]
    calls = ways(weights)
    rows = []
    print(f"{'rows':>6}" + "".join(f"{name:>20}" for name in calls) + "   (ms for the linears of a forward pass)")
    with torch.inference_mode():
        for m in args.rows:
            inputs = {k: torch.randn(m, k, generator=g) for _, k in shapes}
            times = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, fns in calls.items():
                    start = time.perf_counter()
                    for fn, (_, k) in zip(fns, shapes):
                        fn(inputs[k])
                    times[name].append((time.perf_counter() - start) * 1e3)
            row = {"rows": m, **{name: round(statistics.median(t), 2) for name, t in times.items()}}
            rows.append(row)
            print(f"{m:>6}" + "".join(f"{row[n]:>20.2f}" for n in calls), flush=True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split()[2:] if f.startswith(("avx512", "amx", "avx2"))})
    result = {"threads": args.num_threads, "rounds": args.rounds, "layers": args.layers, "torch": torch.__version__,
              "capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": flags, "ms": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
