"""What structured outputs cost a batch: decode steps of 64 sequences with none constrained, then
with 8 of them constrained by a JSON schema, on the real scheduler and worker (in this process, no
gRPC), alternating the two batches so that both see the same machine:

    python benchmarks/structured_outputs.py --model models/SmolLM2-135M-Instruct

Prints the median step time and the median time of the sampler (where the bitmask is filled and
applied) for each batch. A number that prints, not a test: timing on a shared machine is noisy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from pagedserve.v1 import scheduler_pb2 as pb  # noqa: E402
from pagedserve.scheduler.request import SamplingLimits  # noqa: E402
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from pagedserve.scheduler.validation import with_defaults  # noqa: E402
from pagedserve.worker.config import WorkerConfig  # noqa: E402
from pagedserve.worker.model_runner import ModelRunner  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"}}}}


def new_batch(runner: ModelRunner, batch: int, constrained: int, prompt_len: int, seed: int) -> Scheduler:
    """A scheduler holding `batch` requests, the first `constrained` of them under SCHEMA."""
    runner.batch.free(list(runner.batch.seqs))
    scheduler = Scheduler(SchedulerConfig(num_blocks=runner.num_blocks, block_size=runner.config.block_size,
                                          max_model_len=runner.loaded.max_model_len, max_num_seqs=batch,
                                          max_num_batched_tokens=batch * prompt_len, enable_prefix_caching=False))
    rng = np.random.default_rng(seed)
    for i in range(batch):
        params = with_defaults(pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10**6))
        if i < constrained:
            params.structured_outputs.json = json.dumps(SCHEMA)
        prompt = rng.integers(1000, runner.loaded.vocab_size, size=prompt_len).tolist()
        scheduler.add_request(f"r{i}", prompt, params, SamplingLimits.of(params, eos_token_ids=frozenset()))
    return scheduler


def timed_steps(runner: ModelRunner, scheduler: Scheduler, steps: int) -> tuple[list[float], list[float]]:
    """Step and sampler seconds of `steps` decode steps (after the prefill and one more step)."""
    sampler, sampler_times = runner.sampler, []

    def timed_sampler(*args):
        started = time.perf_counter()
        try:
            return sampler(*args)
        finally:
            sampler_times.append(time.perf_counter() - started)

    runner.sampler = timed_sampler
    step_times = []
    try:
        for i in range(steps + 2):
            plan = scheduler.schedule()
            started = time.perf_counter()
            result = runner.execute(plan)
            step_times.append(time.perf_counter() - started)
            if result.error:
                raise RuntimeError(result.error)
            scheduler.update(result)
    finally:
        runner.sampler = sampler
    return step_times[2:], sampler_times[2:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--constrained", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="decode steps measured per round")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two batches")
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args()

    runner = ModelRunner(WorkerConfig(model=args.model, num_threads=args.num_threads))
    runner.grammars.check(pb.StructuredOutputParams(json=json.dumps(SCHEMA)))  # compile once, as the check RPC does
    results = {0: ([], []), args.constrained: ([], [])}
    for round_ in range(args.rounds):
        for constrained, (steps, sampling) in results.items():
            scheduler = new_batch(runner, args.batch, constrained, args.prompt_len, seed=round_)
            step_times, sampler_times = timed_steps(runner, scheduler, args.steps)
            steps.extend(step_times)
            sampling.extend(sampler_times)
    base = statistics.median(results[0][0])
    for constrained, (steps, sampling) in results.items():
        step, sample = statistics.median(steps), statistics.median(sampling)
        print(f"batch {args.batch}, {constrained:2d} constrained: step {step * 1e3:7.1f} ms "
              f"(x{step / base:.3f}), sampler {sample * 1e3:6.2f} ms, over {len(steps)} decode steps")


if __name__ == "__main__":
    main()
