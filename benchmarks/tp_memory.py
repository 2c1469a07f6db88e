"""How much of the model each tensor parallel rank holds: the model loaded at each size, every rank
in its own process (joined in a gloo group), each reporting the bytes of the weights it holds and
how much its resident memory grew while loading (peak and after), so a rank that read the whole
checkpoint to keep a slice would show.

    python benchmarks/tp_memory.py --model models/SmolLM2-135M-Instruct --sizes 1 3 --output tp_memory.json

Weights only: no KV cache is allocated. Ranks split the projections and the vocabulary; norms
(and KV heads where ranks outnumber them) are replicated, so a rank holds a little over 1/N.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedserve.worker import distributed  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rank_memory(model_dir: str, dtype: str) -> dict:
    """Runs in a rank's own process: load this rank's share and measure it."""
    from pagedserve.worker.attention import TorchAttention
    from pagedserve.worker.config import WorkerConfig
    from pagedserve.worker.loader import load_model

    before = resident_bytes()
    config = WorkerConfig(model=model_dir, dtype=dtype, rank=distributed.rank(), world_size=distributed.world_size())
    model = load_model(config, TorchAttention()).model
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}  # tied: once
    return {
        "rank": distributed.rank(),
        "weight_bytes": sum(weights.values()),
        "rss_growth_bytes": resident_bytes() - before,
        "peak_rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 3], help="tensor parallel sizes to load at (SmolLM2: 9 heads, 3 KV heads)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()

    results = []
    for size in args.sizes:
        ranks = distributed.run_local_ranks(size, rank_memory, str(Path(args.model).resolve()), args.dtype)
        results.append({"tensor_parallel_size": size, "ranks": ranks})
    whole = results[0]["ranks"][0]["weight_bytes"] * results[0]["tensor_parallel_size"]
    print(f"{'TP':>3} {'rank':>4} {'weight MiB':>11} {'of TP=1':>8} {'RSS growth MiB':>15} {'peak growth MiB':>16}")
    for result in results:
        for r in result["ranks"]:
            print(f"{result['tensor_parallel_size']:>3} {r['rank']:>4} {r['weight_bytes'] / 2**20:>11.1f} "
                  f"{r['weight_bytes'] / whole:>8.3f} {r['rss_growth_bytes'] / 2**20:>15.1f} "
                  f"{r['peak_rss_growth_bytes'] / 2**20:>16.1f}")
    if args.output:
        report = {"model": args.model, "dtype": args.dtype, "results": results}
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
