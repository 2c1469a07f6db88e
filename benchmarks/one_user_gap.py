"""Where one user's time per output token goes, end to end: a real `pagedserve serve` (with
--log-level debug), one streamed request at a time, and three clocks per decode step:

    python benchmarks/one_user_gap.py --model models/SmolLM2-135M-Instruct --requests 5

- the worker's step (StepResult.forward_seconds: inputs, forward, LM head, sampling),
- the scheduler's round trip (plan sent to result received: adds the worker's gRPC handling),
- the client's inter-token latency (SSE chunk to SSE chunk: adds the scheduler's result handling,
  publishing, the next plan, and the router's path to the client).

The differences are the costs of each hop. Extra `serve` flags go after `--`; the worker's
environment (e.g. GOMP_SPINCOUNT=1000) with --env, repeatable.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedserve.entrypoints.launcher import free_port  # noqa: E402

WORKER_STEP = re.compile(r"pagedserve\.worker\.model_runner: step (\d+): 1 tokens in ([\d.]+) ms")
ROUND_TRIP = re.compile(r"step (\d+) done in ([\d.]+) ms \(worker forward ([\d.]+) ms\)")


def start_server(model: str, port: int, env: dict, serve_args: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", model, "--port", str(port),
           "--grpc-port", str(free_port()), "--log-level", "debug", *serve_args]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the server did not start within 300 s; see {log_path}")


def stream_one(port: int, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival times (perf_counter seconds) of the SSE chunks that carry text."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    times = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"]:
                    times.append(time.perf_counter())
    return times


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's processes")
    p.add_argument("--json", help="write the result here")
    p.add_argument("serve_args", nargs="*", help="more `pagedserve serve` flags (after --)")
    a = p.parse_args()
    env = dict(kv.split("=", 1) for kv in a.env)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        proc = start_server(a.model, port, env, a.serve_args, log_path)
        try:
            served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            rng = random.Random(0)
            vocab = json.loads((Path(a.model) / "config.json").read_text()).get("vocab_size", 40000)
            itl = []
            for _ in range(a.requests):
                prompt = [rng.randrange(min(100, vocab // 2), min(40000, vocab)) for _ in range(a.prompt_len)]
                times = stream_one(port, served, prompt, a.max_tokens)
                itl += [(b - t) * 1e3 for t, b in zip(times, times[1:])]
        finally:
            proc.terminate()
            proc.wait(60)
        text = log_path.read_text()
    worker = {int(m[1]): float(m[2]) for m in WORKER_STEP.finditer(text)}  # decode steps: 1 token
    decode_trips = [float(m[2]) for m in ROUND_TRIP.finditer(text) if int(m[1]) in worker]
    result = {
        "env": env, "serve_args": a.serve_args, "requests": a.requests, "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens, "load_average": os.getloadavg(),
        "client_itl_ms": median_ms(itl),
        "scheduler_round_trip_ms": median_ms(decode_trips),
        "worker_step_ms": median_ms(list(worker.values())),
    }
    result["worker_grpc_and_handoff_ms"] = round(result["scheduler_round_trip_ms"] - result["worker_step_ms"], 2)
    result["scheduler_router_client_ms"] = round(result["client_itl_ms"] - result["scheduler_round_trip_ms"], 2)
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
