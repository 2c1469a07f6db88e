"""The linears of one decode step at batch 1 (SmolLM2-135M's shapes: 30 layers of qkv, o, gate_up,
down, and the LM head), per weight format, timed interleaved in one process (medians), so that a
shared machine's load hits every format alike.

    python benchmarks/quant_linear.py [--threads 1] [--repeats 15] [--rows 1] [--json out.json]

"Q8_0 (cpu/q8_0.c)" holds the weight as Q8_0 blocks (an int8 code a weight, a scale per 32) and
quantizes the activation per 32 too; "int8" requantizes per output channel for torch's op.
"4-bit (cpu/q8_0.c q4_linear)" runs the int4 column's weight (w = d q + m a 32) on the same
quantized activation.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.worker.cpu.linear import prepare_linears
from pagedserve.worker.cpu import q8_0
from pagedserve.worker.quant_linear import Int4Linear, Int8Linear, Q4Linear, Q8_0Linear, quantize_int4, quantize_int8

SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]  # (out, in) per layer
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def formats(weight: torch.Tensor) -> dict:
    fp32 = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    fp32[0].weight.data.copy_(weight)
    prepare_linears(fp32)  # the C kernel at few rows, as the worker serves float32
    bf16 = weight.bfloat16()
    return {
        "float32 (cpu/linear.c)": fp32,
        "float32 F.linear": lambda x: F.linear(x, weight),
        "bfloat16 F.linear": lambda x: F.linear(x.bfloat16(), bf16).float(),
        "int8 (_weight_int8pack_mm)": Int8Linear(*quantize_int8(weight), None),
        "int4 (_weight_int4pack_mm_for_cpu)": Int4Linear.from_affine(*quantize_int4(weight)),
        # the weight's Q8_0 blocks (float32 scales here; a file's are fp16: the same work)
        "Q8_0 (cpu/q8_0.c)": Q8_0Linear(*q8_0.kernel().quantize(weight), None, q8_0.kernel()),
        "4-bit (cpu/q8_0.c q4_linear)": Q4Linear(*quantize_int4(weight), None, q8_0.kernel()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rows", type=int, default=1, help="rows of x (a decode step's batch)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    layers = [formats(torch.randn(n, k) * 0.05) for n, k in SHAPES]
    head = formats(torch.randn(VOCAB, HIDDEN) * 0.05)
    xs = [torch.randn(args.rows, k) for _, k in SHAPES]
    times = {name: [] for name in head}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name in times:
                start = time.perf_counter()
                for layer, inputs in zip(layers, xs):  # one layer's linears, scaled to 30 layers
                    layer[name](inputs)
                per_layer = time.perf_counter() - start
                start = time.perf_counter()
                head[name](xs[0])  # the LM head: HIDDEN in, as qkv
                times[name].append((per_layer * LAYERS + time.perf_counter() - start) * 1e3)
    result = {name: round(statistics.median(v), 2) for name, v in times.items()}
    for name, ms in result.items():
        print(f"{name:38s} {ms:8.2f} ms a decode step's linears")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "rows": args.rows,
                       "ms_per_step_linears": result}, f, indent=1)


if __name__ == "__main__":
    main()
