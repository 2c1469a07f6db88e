"""Runs the whole stack (`pagedserve serve`: worker ranks, scheduler, router) as real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc

from pagedserve.entrypoints.healthcheck import http_ok
from pagedserve.entrypoints.launcher import free_port
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc

ROOT = Path(__file__).resolve().parents[2]


class Stack:
    def __init__(self, proc: subprocess.Popen, port: int, grpc_port: int, log_path: Path):
        self.proc = proc
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.root_url = f"http://127.0.0.1:{port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.log_path = log_path
        self.channel = grpc.insecure_channel(self.grpc_address)
        self.scheduler = pbgrpc.SchedulerStub(self.channel)

    def stats(self) -> pb.SchedulerStats:
        return self.scheduler.GetStats(pb.GetStatsRequest(), timeout=10)

    def wait_idle(self, timeout: float = 120.0) -> pb.SchedulerStats:
        """The scheduler's stats once nothing runs, waits or holds a KV block (or, on a machine
        too busy for that, after `timeout` seconds: the caller's assertions then say what is left)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = stats.num_requests_running == 0 and stats.num_requests_waiting == 0
            if idle and stats.kv_blocks_used == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)

    def generate(self, prompt: list[int], max_tokens: int, **params) -> list[int]:
        """Token ids of one generation over the public gRPC API (greedy unless params say)."""
        request = pb.GenerateRequest(prompt_token_ids=prompt, params=pb.SamplingParams(
            max_tokens=max_tokens, **{"temperature": 0, **params}))
        return [t for reply in self.scheduler.Generate(request, timeout=600) for t in reply.token_ids]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launch(model_dir: Path, *flags: str, log_dir: Path, cwd: Path = ROOT, env: dict | None = None) -> Stack:
    """Starts `pagedserve serve` (its log in log_dir) in `cwd` with os.environ updated by `env`, and
    returns at once, before it is healthy."""
    port, grpc_port = free_port(), free_port()
    log_path = log_dir / f"stack-{port}.log"
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return Stack(proc, port, grpc_port, log_path)


def wait_healthy(stack: Stack, timeout: float) -> None:
    """Returns once the stack's router answers /health; RuntimeError with its log's tail if the
    process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not http_ok(f"{stack.root_url}/health"):
        if stack.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not start:\n{stack.log()[-5000:]}")
        time.sleep(0.5)


def stop(*stacks: Stack) -> None:
    """SIGTERM to each (all at once, so their shutdowns overlap), then SIGKILL to any still running
    60 s later: the launcher stops its children on either."""
    running = [stack.proc for stack in stacks if stack.proc.poll() is None]
    for stack in stacks:
        stack.channel.close()
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def run_stack(model_dir: Path, *flags: str, log_dir: Path, timeout: float = 300.0, cwd: Path = ROOT,
              env: dict | None = None):
    stack = launch(model_dir, *flags, log_dir=log_dir, cwd=cwd, env=env)
    try:
        wait_healthy(stack, timeout)
        yield stack
    finally:
        stop(stack)


@contextmanager
def run_stacks(servers: dict, log_dir: Path, timeout: float = 300.0):
    """Several stacks started at once (their startups, mostly single-threaded imports, overlap on
    the machine's cores): `servers` maps a name to (model directory, flags); yields name -> Stack
    once every one is healthy, and stops them all on exit."""
    stacks = {}
    try:
        for name, (model_dir, flags) in servers.items():
            stacks[name] = launch(model_dir, *flags, log_dir=log_dir)
        for stack in stacks.values():
            wait_healthy(stack, timeout)
        yield stacks
    finally:
        stop(*stacks.values())


def generate_all(stack, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids for every prompt from the stack's gRPC API, requested concurrently (so
    they share steps), EOS ignored."""
    params = pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def generate(prompt):
        request = pb.GenerateRequest(prompt_token_ids=prompt, params=params)
        return [token for reply in stack.scheduler.Generate(request, timeout=120) for token in reply.token_ids]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(generate, prompts))
