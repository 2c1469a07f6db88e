"""`pagedserve serve`: starts the worker ranks, the scheduler and the router as child processes,
waits until each is healthy, and stops them all, router first, when one dies or on Ctrl-C/SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpc_serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


class Launcher:
    def __init__(self, args, output=None):
        self.args = args
        self.output = output  # a file for the children's stdout and stderr; None: ours
        self.procs: list[tuple[str, subprocess.Popen]] = []  # in start order

    # ----- commands ---------------------------------------------------------------------------

    def worker_command(self, rank: int, port: int, dist_port: int) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "worker", "--model", a.model, "--host", "127.0.0.1",
               "--port", str(port), "--device", a.device, "--dtype", a.dtype,
               "--block-size", str(a.block_size), "--load-format", a.load_format,
               "--attention-backend", a.attention_backend, "--seed", str(a.seed)]
        if a.tensor_parallel_size > 1:
            cmd += ["--rank", str(rank), "--world-size", str(a.tensor_parallel_size),
                    "--dist-init-addr", f"127.0.0.1:{dist_port}"]
        cmd += self.optional("--max-model-len", "--kv-cache-memory-bytes",
                             "--num-gpu-blocks-override", "--num-threads")
        return cmd

    def scheduler_command(self, worker_addrs: list[str]) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "scheduler", "--worker-addrs", ",".join(worker_addrs),
               "--host", a.host, "--port", str(a.grpc_port),
               "--max-num-seqs", str(a.max_num_seqs),
               "--max-num-batched-tokens", str(a.max_num_batched_tokens),
               "--max-waiting-requests", str(a.max_waiting_requests),
               "--shutdown-timeout", str(a.shutdown_timeout),
               "--enable-prefix-caching" if a.enable_prefix_caching else "--no-enable-prefix-caching"]
        return cmd + self.optional("--served-model-name", "--max-model-len", "--api-key")

    def router_command(self) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "router", "--model", a.model,
               "--scheduler-addr", f"127.0.0.1:{a.grpc_port}", "--host", a.host, "--port", str(a.port)]
        return cmd + self.optional("--served-model-name", "--api-key", "--chat-template",
                                   "--max-model-len")

    def optional(self, *flags: str) -> list[str]:
        out = []
        for flag in flags:
            value = getattr(self.args, flag[2:].replace("-", "_"), None)
            if value is not None:
                out += [flag, str(value)]
        return out

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=self.output, stderr=self.output)
        self.procs.append((name, proc))
        return proc

    def wait_until(self, name: str, proc: subprocess.Popen, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise SystemExit(f"pagedserve: {name} exited with code {proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise SystemExit(f"pagedserve: {name} was not healthy after {timeout:.0f} s")
            time.sleep(0.25)

    def run(self) -> int:
        a = self.args
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        try:
            self.start_all()
            print(f"pagedserve: serving {a.served_model_name or os.path.basename(os.path.normpath(a.model))} "
                  f"at http://{a.host}:{a.port}/v1 (gRPC {a.host}:{a.grpc_port})", flush=True)
            return self.supervise()
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop_all()

    def start_all(self) -> None:
        a = self.args
        dist_port = free_port()
        ports = [free_port() for _ in range(a.tensor_parallel_size)]
        workers = [self.start(f"worker {r}", self.worker_command(r, p, dist_port))
                   for r, p in enumerate(ports)]
        for rank, (port, proc) in enumerate(zip(ports, workers)):
            self.wait_until(f"worker {rank}", proc, lambda p=port: grpc_serving(f"127.0.0.1:{p}"),
                            a.startup_timeout)
        scheduler = self.start("scheduler", self.scheduler_command([f"127.0.0.1:{p}" for p in ports]))
        self.wait_until("scheduler", scheduler, lambda: grpc_serving(f"127.0.0.1:{a.grpc_port}"),
                        a.startup_timeout)
        router = self.start("router", self.router_command())
        self.wait_until("router", router, lambda: http_ok(f"http://127.0.0.1:{a.port}/health"),
                        a.startup_timeout)

    def supervise(self) -> int:
        while True:
            for name, proc in self.procs:
                code = proc.poll()
                if code is not None:
                    print(f"pagedserve: {name} exited with code {code}; stopping", file=sys.stderr)
                    return code or 1
            time.sleep(0.5)

    def on_signal(self, signum, frame) -> None:
        raise KeyboardInterrupt

    def stop_all(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.stop_children()

    def stop_children(self) -> None:
        """Router first (no new requests), then the scheduler, then the workers: each lets the work
        in flight drain before the process behind it goes away. Leaves signal handlers alone, so
        a library (pagedserve.LLM) can call it from any thread of its host process."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.args.shutdown_timeout + 5)
                except subprocess.TimeoutExpired:
                    print(f"pagedserve: {name} did not stop; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
