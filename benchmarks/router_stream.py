"""The router's own cost of streaming: CPU seconds of the router process per 1,000 streamed tokens,
with many streams at once, against a scheduler that costs nothing (tests/helpers/fake_scheduler.py in a
process of its own), so that only the router's work is counted:

    python benchmarks/router_stream.py --model models/SmolLM2-135M-Instruct --streams 256 --output-len 256

Per token the router parses a gRPC message, detokenizes incrementally, scans stop strings, builds
the OpenAI chunk, serializes it and frames it as a server-sent event through Starlette and
uvicorn. The router's CPU time is read from /proc (all its threads, user + system) over the
streaming phase only; it is far steadier on a shared machine than wall time, which is printed
too. --profile FILE runs the router under cProfile and leaves its stats in FILE.
Prints a summary and writes it as JSON (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from pagedserve.entrypoints.healthcheck import http_ok  # noqa: E402
from pagedserve.entrypoints.launcher import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process, all its threads, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def serve_fake_scheduler(model: str, port: int, output_len: int) -> None:
    """The fake scheduler's process: every sequence writes the same real text (README.md encoded,
    repeated), one token per message, without EOS, so each stream is exactly output_len long."""
    from pagedserve.router.tokenizer import Tokenizer
    from tests.helpers.fake_scheduler import FakeScheduler, FakeSchedulerServer

    tokenizer = Tokenizer(model)
    text_ids = tokenizer.encode((ROOT / "README.md").read_text(), add_special_tokens=False)
    tokens = (text_ids * (output_len // len(text_ids) + 1))[:output_len]
    eos = [tokenizer.hf.eos_token_id]
    fake = FakeScheduler(vocab_size=len(tokenizer), eos_token_ids=eos, model_path=model,
                         served_model_name="bench",
                         script=lambda prompt, params, index: [t for t in tokens if t not in eos])

    async def main() -> None:
        server = FakeSchedulerServer(fake, port)
        await server.start()
        await asyncio.Event().wait()

    asyncio.run(main())


async def one_stream(client: httpx.AsyncClient, body: dict) -> int:
    """Streams one completion or chat; returns its completion_tokens (from the usage chunk)."""
    tokens = 0
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    async with client.stream("POST", path, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def drive(url: str, streams: int, output_len: int, chat: bool) -> tuple[int, float]:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    body = {"model": "bench", "max_tokens": output_len, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        await one_stream(client, {**body, "max_tokens": 4})  # warm-up: connections, caches
        start = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, body) for _ in range(streams)))
        return sum(counts), time.perf_counter() - start


def run(args) -> dict:
    scheduler_port, router_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    fake = subprocess.Popen([sys.executable, __file__, "--serve-fake-scheduler", str(scheduler_port),
                             "--model", args.model, "--output-len", str(args.output_len)], env=env)
    profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    router = subprocess.Popen([sys.executable, *profile, "-m", "pagedserve.router", "--model", args.model,
                               "--scheduler-addr", f"127.0.0.1:{scheduler_port}",
                               "--host", "127.0.0.1", "--port", str(router_port),
                               "--log-level", "WARNING"], env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{router_port}"
        deadline = time.monotonic() + 120
        while not http_ok(f"{url}/health"):
            if time.monotonic() > deadline or router.poll() is not None or fake.poll() is not None:
                raise SystemExit("the router or the fake scheduler did not start")
            time.sleep(0.2)
        results = []
        for _ in range(args.rounds):
            user, system = cpu_seconds(router.pid)
            tokens, wall = asyncio.run(drive(url, args.streams, args.output_len, args.chat))
            user, system = (after - before for after, before in zip(cpu_seconds(router.pid),
                                                                     (user, system)))
            cpu = user + system
            results.append({"tokens": tokens, "wall_s": round(wall, 3),
                            "router_cpu_s": round(cpu, 3), "router_user_s": round(user, 3),
                            "router_system_s": round(system, 3),
                            "router_cpu_s_per_1k_tokens": round(1000 * cpu / tokens, 4),
                            "tokens_per_s": round(tokens / wall, 1)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        router.terminate()
        fake.terminate()
        router.wait(30)
        fake.wait(30)
    best = min(results, key=lambda r: r["router_cpu_s_per_1k_tokens"])
    return {"streams": args.streams, "output_len": args.output_len, "chat": args.chat,
            "model": args.model, "rounds": results, "best": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="a model directory (its tokenizer only)")
    p.add_argument("--streams", type=int, default=256, help="concurrent streamed requests")
    p.add_argument("--output-len", type=int, default=256, help="tokens per stream")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (the best is kept)")
    p.add_argument("--chat", action="store_true", help="/v1/chat/completions, not /v1/completions")
    p.add_argument("--profile", help="run the router under cProfile, stats to this file")
    p.add_argument("--out", default="router_stream.json", help="where the JSON summary goes")
    p.add_argument("--serve-fake-scheduler", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake_scheduler is not None:
        return serve_fake_scheduler(args.model, args.serve_fake_scheduler, args.output_len)
    summary = run(args)
    best = summary["best"]
    print(f"router: {best['router_cpu_s_per_1k_tokens']:.3f} CPU s per 1,000 streamed tokens "
          f"({args.streams} streams x {args.output_len} tokens, best of {args.rounds}; "
          f"{best['tokens_per_s']:.0f} tok/s wall)")
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
