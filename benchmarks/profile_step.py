"""Where a decode step's time goes: the real scheduler plans for a batch of decoding sequences, the
plans travel over a real gRPC Execute stream to a real worker (in this process, on a local port),
and every part of the step is timed on its own:

    python benchmarks/profile_step.py --model models/SmolLM2-135M-Instruct --batch 32

forward pass (matmuls, norms, rotary), attention, LM head, sampling, the worker's input tensors and
persistent batch, plan building and result handling in the scheduler, protobuf serialization,
gRPC transport, and what is left (Python overhead). --torch-profile adds torch's op table.

Any model shape, with dummy weights, on the CPU or CUDA: --hf-overrides (vLLM's flag) and
--vocab-size change --model's config.json in a temporary directory of its config and tokenizer,
e.g. the no-op model of `pagedserve bench host` with a 150k vocabulary, to time the sampler:

    python benchmarks/profile_step.py --load-format dummy --batch 256 --prompt-len 64 \
        --hf-overrides '{"num_hidden_layers": 1, "hidden_size": 128, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 256}' --vocab-size 151936
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedserve.worker.__main__ import set_openmp_wait  # noqa: E402

set_openmp_wait(os.environ)  # the served worker's OpenMP wait, set before torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pagedserve.entrypoints.bench.model_dir import build_model_dir, parse_overrides  # noqa: E402
from pagedserve.entrypoints.launcher import free_port  # noqa: E402
from pagedserve.v1 import scheduler_pb2 as pb  # noqa: E402
from pagedserve.v1 import worker_pb2 as wpb  # noqa: E402
from pagedserve.scheduler.request import SamplingLimits  # noqa: E402
from pagedserve.scheduler.validation import with_defaults  # noqa: E402
from pagedserve.scheduler.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from pagedserve.scheduler.workers import WorkerGroup  # noqa: E402
from pagedserve.worker.config import WorkerConfig  # noqa: E402
from pagedserve.worker.model_runner import ModelRunner  # noqa: E402
from pagedserve.worker.service import build_server  # noqa: E402
from pagedserve.worker.step_loop import StepLoop  # noqa: E402


class Clock:
    """Seconds per named part, summed over the measured steps only."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.on = False

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.on:
                self.totals[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return timed


def instrument(runner: ModelRunner, clock: Clock) -> None:
    """Times the worker's parts by wrapping them where the step calls them."""
    batch, backend, model = runner.batch, runner.backend, runner.model
    for name in ("free", "add", "begin_step", "finish_step"):
        setattr(batch, name, clock.wrap("worker: persistent batch update", getattr(batch, name)))
    batch.prepare_inputs = clock.wrap("worker: input tensors and metadata", batch.prepare_inputs)
    backend.prepare = clock.wrap("attention", backend.prepare)
    backend.forward = clock.wrap("attention", backend.forward)
    model.forward = clock.wrap("forward (all)", model.forward)
    model.compute_logits = clock.wrap("LM head", model.compute_logits)
    runner.sampler = clock.wrap("sampling", runner.sampler)
    runner.execute = clock.wrap("worker: whole step", runner.execute)


def add_requests(scheduler: Scheduler, batch: int, prompt_lens: list[int], vocab_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = with_defaults(pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10**6))
    limits = SamplingLimits.of(params, eos_token_ids=frozenset())
    for i in range(batch):
        prompt = rng.integers(1000, vocab_size, size=prompt_lens[i]).tolist()
        scheduler.add_request(f"r{i}", prompt, params, limits)


async def drive(scheduler: Scheduler, workers: WorkerGroup, clock: Clock, warmup: int, steps: int) -> dict:
    """Steps until every sequence decodes, `warmup` more, then `steps` measured ones."""
    workers.open()
    sizes = []
    measured = 0
    while measured < steps:
        decoding = all(s.num_tokens - s.num_computed == 1 for s in scheduler.running) and not scheduler.waiting
        if decoding and warmup == 0:
            clock.on = True
        elif decoding:
            warmup -= 1
        with clock.part("scheduler: plan building"):
            plan = scheduler.schedule()
        with clock.part("step (as the scheduler sees it)"):
            with clock.part("gRPC round trip"):
                await workers.send(plan)
                result = await workers.receive()
            with clock.part("scheduler: result handling"):
                scheduler.update(result)
        if result.error:
            raise RuntimeError(result.error)
        if clock.on:
            # What gRPC does to these messages, done again here to time it.
            with clock.part("protobuf serialization"):
                wpb.StepPlan.FromString(plan.SerializeToString())
                wpb.StepResult.FromString(result.SerializeToString())
            sizes.append((plan.ByteSize(), result.ByteSize(), len(plan.scheduled)))
            measured += 1
    workers.cancel()
    return {"plan_bytes": float(np.mean([s[0] for s in sizes])), "result_bytes": float(np.mean([s[1] for s in sizes])),
            "batch": float(np.mean([s[2] for s in sizes]))}


async def drive_ahead(scheduler: Scheduler, workers: WorkerGroup, clock: Clock, warmup: int, steps: int) -> dict:
    """drive() with async scheduling, as the engine runs it: plan N+1 is built and sent before
    result N is applied, so plan building and result handling overlap the worker's step. Only the
    wall time per step and the scheduler's own parts are timed (the rest overlaps). Here the
    scheduler is a thread of the worker's process, so its work still takes the worker's GIL;
    served, it is a process of its own."""
    workers.open()
    sent = 0
    measured, started = -1, 0.0
    while measured < steps:
        while sent < 2:
            with clock.part("scheduler: plan building"):
                plan = scheduler.schedule()
            await workers.send(plan)
            sent += 1
        result = await workers.receive()
        sent -= 1
        if result.error:
            raise RuntimeError(result.error)
        with clock.part("scheduler: result handling"):
            scheduler.update(result)
        decoding = all(s.num_tokens - s.num_computed - s.num_scheduled <= 1 for s in scheduler.running)
        if measured < 0 and decoding and not scheduler.waiting:
            warmup -= 1
            if warmup < 0:
                measured, started, clock.on = 0, time.perf_counter(), True
        elif measured >= 0:
            measured += 1
    clock.totals["step (wall, overlapped)"] = time.perf_counter() - started
    clock.on = False
    while sent:
        await workers.receive()
        sent -= 1
    workers.cancel()
    return {"batch": float(len(scheduler.running))}


def report_ahead(ms: dict[str, float], info: dict) -> str:
    total = ms["step (wall, overlapped)"]
    return "\n".join([
        f"decode step at batch {info['batch']:.0f} with async scheduling: {total:.1f} ms "
        f"({info['batch'] / total * 1e3:.0f} tokens/s), {info['threads']} torch threads",
        f"  {'worker: whole step':<46}{ms['worker: whole step']:8.2f} ms",
        f"  {'scheduler: plan building (overlapped)':<46}{ms['scheduler: plan building']:8.2f} ms",
        f"  {'scheduler: result handling (overlapped)':<46}{ms['scheduler: result handling']:8.2f} ms",
        f"  {'between worker steps (gRPC, glue)':<46}{total - ms['worker: whole step']:8.2f} ms"])


def breakdown(totals: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds per step of each disjoint part; their sum is the step as the scheduler sees it."""
    ms = {k: v * 1e3 / steps for k, v in totals.items()}
    attention, lm_head = ms.get("attention", 0.0), ms.get("LM head", 0.0)
    worker = ms["worker: whole step"]
    parts = {
        "forward pass (matmuls, norms, rotary, MLP)": ms["forward (all)"] - attention,
        "attention": attention,
        "LM head": lm_head,
        "sampling": ms.get("sampling", 0.0),
        "worker: input tensors and metadata": ms.get("worker: input tensors and metadata", 0.0),
        "worker: persistent batch update": ms.get("worker: persistent batch update", 0.0),
    }
    parts["worker: Python overhead (result, glue)"] = worker - sum(parts.values())
    serialization = ms.get("protobuf serialization", 0.0)
    parts["protobuf serialization"] = serialization
    parts["gRPC transport"] = ms["gRPC round trip"] - worker - serialization
    parts["scheduler: plan building"] = ms["scheduler: plan building"]
    parts["scheduler: result handling"] = ms["scheduler: result handling"]
    seen = ms["step (as the scheduler sees it)"]
    parts["scheduler: loop overhead"] = seen - ms["gRPC round trip"] - ms["scheduler: result handling"]
    parts["step total"] = seen + ms["scheduler: plan building"]
    return parts


def report(parts: dict[str, float], info: dict) -> str:
    total = parts["step total"]
    lines = [f"decode step at batch {info['batch']:.0f}: {total:.1f} ms "
             f"({info['batch'] / total * 1e3:.0f} tokens/s), plan {info['plan_bytes']:.0f} B, "
             f"result {info['result_bytes']:.0f} B, {info['threads']} torch threads"]
    for name, ms in parts.items():
        if name != "step total":
            lines.append(f"  {name:<46}{ms:8.2f} ms {ms / total:6.1%}")
    outside = total - parts["forward pass (matmuls, norms, rotary, MLP)"] - parts["attention"] - parts["LM head"]
    lines.append(f"  {'outside the forward pass':<46}{outside:8.2f} ms {outside / total:6.1%}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=0, help="0: uniform in [32, 512] (the benchmark's prompts)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights (needed with --hf-overrides and --vocab-size)")
    p.add_argument("--hf-overrides", default=None, metavar="JSON",
                   help='config.json fields to change, e.g. \'{"num_hidden_layers": 1, "hidden_size": 128}\'')
    p.add_argument("--vocab-size", type=int, default=None, help="the LM head's and sampler's vocabulary")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (on CUDA they are captured up to --batch and replace the timed "
                        "forward pass, whose parts then show only in the whole step)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linears (CPU, float32)")
    p.add_argument("--tokenizer", default=None, help="with --model FILE.gguf: the tokenizer directory")
    p.add_argument("--torch-profile", action="store_true", help="also print torch profiler's top ops")
    p.add_argument("--json", default=None, help="write the breakdown here")
    p.add_argument("--async-scheduling", action="store_true",
                   help="build each plan while the step before it runs, as `serve --async-scheduling` does")
    return p.parse_args(argv)


def overrides_of(args) -> dict:
    """--hf-overrides and --vocab-size as one dict of config.json fields; exits when they are
    malformed or ask for real weights (the shaped directory has none)."""
    try:
        overrides = parse_overrides(args.hf_overrides)
    except ValueError as e:
        raise SystemExit(f"profile_step: {e}") from None
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    if overrides and args.load_format != "dummy":
        raise SystemExit("profile_step: --hf-overrides and --vocab-size change the model's shape, which its "
                         "weights no longer fit: add --load-format dummy")
    return overrides


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = overrides_of(args)
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        if overrides:
            args.model = str(build_model_dir(args.model, Path(tmp) / "model", overrides))
        return profile(args, overrides)


def profile(args, overrides: dict) -> dict:
    """Runs the steps of `args` and prints their breakdown; returns what --json writes."""
    runner = ModelRunner(WorkerConfig(model=args.model, block_size=args.block_size, num_threads=args.num_threads,
                                      device=args.device, dtype=args.dtype, load_format=args.load_format,
                                      enforce_eager=args.enforce_eager, max_num_seqs=args.batch,
                                      quantization=args.quantization, tokenizer=args.tokenizer))
    rng = np.random.default_rng(args.seed)
    lens = [args.prompt_len] * args.batch if args.prompt_len else rng.integers(32, 513, size=args.batch).tolist()
    clock = Clock()
    instrument(runner, clock)
    scheduler = Scheduler(SchedulerConfig(num_blocks=runner.num_blocks, block_size=args.block_size,
                                          max_model_len=runner.loaded.max_model_len,
                                          max_num_batched_tokens=args.max_num_batched_tokens))
    add_requests(scheduler, args.batch, lens, runner.loaded.vocab_size, args.seed)
    address = f"127.0.0.1:{free_port()}"
    step_loop = StepLoop()  # steps on this thread, which loaded the model, as in the worker
    server, _ = build_server(runner, address, step_loop)
    server.start()

    async def run():
        workers = WorkerGroup([address])
        await workers.wait_ready(timeout=60)
        try:
            run_steps = drive_ahead if args.async_scheduling else drive
            return await run_steps(scheduler, workers, clock, args.warmup, args.steps)
        finally:
            await workers.close()

    def run_steps() -> dict:
        """The scheduler's loop on a thread of its own; the steps on this one."""
        box, done = {}, threading.Event()

        def scheduler_side():
            try:
                box["info"] = asyncio.run(run())
            except BaseException as e:  # noqa: BLE001 - raised again below
                box["error"] = e
            finally:
                done.set()
        threading.Thread(target=scheduler_side, daemon=True).start()
        step_loop.serve(until=done)
        if "error" in box:
            raise box["error"]
        return box["info"]

    try:
        if args.torch_profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                info = run_steps()
        else:
            info = run_steps()
    finally:
        server.stop(grace=None)
    info["threads"] = torch.get_num_threads()
    if args.async_scheduling:
        parts = {k: v * 1e3 / args.steps for k, v in clock.totals.items()}
        print(report_ahead(parts, info))
    else:
        parts = breakdown(clock.totals, args.steps)
        print(report(parts, info))
    if args.torch_profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    choices = runner.worker_info().kernel_choices  # what ran quantized, oneDNN, ... and why
    print("kernel choices:\n" + "".join(f"  {line}\n" for line in choices), end="")
    out = {"parts_ms": parts, **info, "steps": args.steps, "cpu_count": len(os.sched_getaffinity(0)),
           "vocab_size": runner.loaded.vocab_size, "num_layers": runner.loaded.hf_config.num_hidden_layers,
           "hidden_size": runner.loaded.hf_config.hidden_size, "hf_overrides": overrides,
           "kernel_choices": list(choices)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
