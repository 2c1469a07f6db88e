"""`pagedserve serve`: starts the worker ranks, the scheduler and the router as child processes,
waits until each is healthy, restarts any that dies, and stops them all, router first, on
Ctrl-C/SIGTERM. Headless (vLLM's word), it starts no router: a front end in the launching process
(the offline LLM) talks gRPC to the scheduler itself.

With --data-parallel-size N it starts N engine replicas, each a scheduler (on --grpc-port + i)
and its --tensor-parallel-size workers (on CUDA, each replica on its own slice of the visible
GPUs, by CUDA_VISIBLE_DEVICES), and one router given every scheduler (--scheduler-addrs), which
routes between them and resumes the requests of a scheduler that dies (router/replicas.py).

Restarting in place is safe because every process recovers from its neighbours' restarts: the
router reconnects to the scheduler, the scheduler holds the requests a lost worker held, resets
its block pool, reconnects and recomputes them (failing them after --resume-timeout), and a worker
resets its batch when a new Execute stream opens.
A child that keeps dying right after it starts stops the whole server instead of looping."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from .healthcheck import grpc_serving, http_ok
from pagedserve.parent_watch import PARENT_ENV
from .serve_args import router_argv, scheduler_argv, worker_argv
from .worker_report import describe_worker


RESTART_WINDOW_S = 60.0   # a child that dies sooner than this after its start counts as crashing
MAX_QUICK_RESTARTS = 3    # after this many crashes in a row, the whole server stops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_address(host: str) -> str:
    """Where this machine reaches a server bound to `host`: loopback for the wildcard addresses,
    else the address itself (a server bound to one interface does not answer on 127.0.0.1)."""
    if host in ("", "0.0.0.0", "::", "[::]", "localhost"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(eq=False)
class Child:
    """A process the launcher runs, and what it needs to start it again."""
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    started: float              # time.monotonic() of its latest start
    quick_exits: int = 0        # deaths within RESTART_WINDOW_S of starting, in a row
    replica: int = 0            # which data parallel replica it belongs to (the router: 0)
    env: dict | None = None     # what it adds to the environment (CUDA_VISIBLE_DEVICES)


def gpu_slice(replica: int, tensor_parallel_size: int) -> str:
    """CUDA_VISIBLE_DEVICES for a replica's workers: its tensor_parallel_size GPUs among those
    visible to the launcher (CUDA_VISIBLE_DEVICES, else 0, 1, ...), so rank k uses cuda:k."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    start = replica * tensor_parallel_size
    if visible:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        chosen = devices[start:start + tensor_parallel_size]
        if len(chosen) < tensor_parallel_size:
            raise SystemExit(f"pagedserve: replica {replica} needs GPUs {start}..{start + tensor_parallel_size - 1}"
                             f" of CUDA_VISIBLE_DEVICES={visible}")
        return ",".join(chosen)
    return ",".join(str(d) for d in range(start, start + tensor_parallel_size))


def replica_name(role: str, replica: int, data_parallel_size: int) -> str:
    """"worker 0", "scheduler" with one replica (as ever); "replica 1 worker 0" with several."""
    return role if data_parallel_size == 1 else f"replica {replica} {role}"


# -P: the children do not put their working directory on sys.path, so a folder or script there named
# like a package they import (our own `kernels/` in a checkout, Hugging Face's `kernels` being
# what transformers imports) never shadows it.
PYTHON = [sys.executable, "-P"]


class Launcher:
    def __init__(self, args, output=None, headless: bool = False):
        self.args = args
        self.output = output  # a file for the children's stdout and stderr; None: ours
        self.headless = headless  # the workers and the scheduler only: no router
        self.children: list[Child] = []  # in start order: workers, scheduler, router
        self.serving = False   # startup is over: a signal now means drain, not abort
        self.stopping = False

    # ----- commands ---------------------------------------------------------------------------

    def worker_command(self, rank: int, port: int, dist_port: int) -> list[str]:
        a = self.args
        cmd = [*PYTHON, "-m", "pagedserve.worker", *worker_argv(a), "--host", "127.0.0.1",
               "--port", str(port)]
        if a.tensor_parallel_size > 1:
            cmd += ["--rank", str(rank), "--world-size", str(a.tensor_parallel_size),
                    "--dist-init-addr", f"127.0.0.1:{dist_port}"]
        return cmd

    def scheduler_command(self, worker_addrs: list[str], grpc_port: int | None = None) -> list[str]:
        a = self.args
        port = a.grpc_port if grpc_port is None else grpc_port
        return [*PYTHON, "-m", "pagedserve.scheduler", *scheduler_argv(a),
                "--worker-addrs", ",".join(worker_addrs), "--host", a.host, "--port", str(port)]

    @property
    def grpc_ports(self) -> list[int]:
        """Each replica's scheduler port: --grpc-port + i, unless the caller chose them
        (LocalServer takes free ones)."""
        a = self.args
        chosen = getattr(a, "grpc_ports", None)
        return list(chosen) if chosen else [a.grpc_port + r for r in range(self.data_parallel_size)]

    @property
    def data_parallel_size(self) -> int:
        return getattr(self.args, "data_parallel_size", 1) or 1

    def router_command(self) -> list[str]:
        a = self.args
        addrs = [f"{local_address(a.host)}:{port}" for port in self.grpc_ports]
        where = (["--scheduler-addr", addrs[0]] if len(addrs) == 1
                 else ["--scheduler-addrs", ",".join(addrs)])
        return [*PYTHON, "-m", "pagedserve.router", *router_argv(a), *where, "--host", a.host,
                "--port", str(a.port)]

    # ----- lifecycle ----------------------------------------------------------------------------

    def spawn(self, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        # A process group of its own: Ctrl-C in a terminal reaches only the launcher, which then
        # stops the children in order instead of all of them dying at once mid-request.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid()),
               **(extra_env or {})}
        return subprocess.Popen(cmd, env=env,
                                stdout=self.output, stderr=self.output, process_group=0)

    def start(self, name: str, cmd: list[str], replica: int = 0,
              env: dict | None = None) -> subprocess.Popen:
        child = Child(name, cmd, self.spawn(cmd, env), time.monotonic(), replica=replica, env=env)
        self.children.append(child)
        self.say(f"pagedserve: started {name} (pid {child.proc.pid})")
        return child.proc

    def say(self, message: str) -> None:
        if self.output is None:
            print(message, file=sys.stderr, flush=True)
        else:
            self.output.write(message.encode() + b"\n")
            self.output.flush()

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
        code = 0
        try:
            self.start_all()
            self.serving = True
            grpc = ", ".join(f"{a.host}:{port}" for port in self.grpc_ports)
            print(f"pagedserve: serving {served_name(a)} at http://{a.host}:{a.port}/v1 (gRPC {grpc})",
                  flush=True)
            code = self.supervise()
        except KeyboardInterrupt:  # a signal while starting: nothing is in flight yet
            pass
        finally:
            clean = self.stop_all()
        return code or (0 if clean else 1)

    def start_all(self) -> None:
        """Every replica's workers (all at once: they load their weights side by side), then
        every scheduler, then the router."""
        a = self.args
        dp = self.data_parallel_size
        worker_ports, started = [], []
        for replica in range(dp):
            dist_port = free_port()
            ports = [free_port() for _ in range(a.tensor_parallel_size)]
            env = ({"CUDA_VISIBLE_DEVICES": gpu_slice(replica, a.tensor_parallel_size)}
                   if dp > 1 and getattr(a, "device", "cpu") == "cuda" else None)
            for rank, port in enumerate(ports):
                name = replica_name(f"worker {rank}", replica, dp)
                proc = self.start(name, self.worker_command(rank, port, dist_port), replica, env)
                started.append((name, proc, port))
            worker_ports.append(ports)
        for name, proc, port in started:
            self.wait_until(name, proc, lambda p=port: grpc_serving(f"127.0.0.1:{p}"),
                            a.startup_timeout)
            self.say(describe_worker(name, f"127.0.0.1:{port}"))
        schedulers = []
        for replica, (ports, grpc_port) in enumerate(zip(worker_ports, self.grpc_ports)):
            name = replica_name("scheduler", replica, dp)
            cmd = self.scheduler_command([f"127.0.0.1:{p}" for p in ports], grpc_port)
            schedulers.append((name, self.start(name, cmd, replica), grpc_port))
        for name, proc, port in schedulers:
            self.wait_until(name, proc, lambda p=port: grpc_serving(f"{local_address(a.host)}:{p}"),
                            a.startup_timeout)
        if self.headless:
            return
        router = self.start("router", self.router_command())
        self.wait_until("router", router, lambda: http_ok(f"http://{local_address(a.host)}:{a.port}/health"),
                        a.startup_timeout)

    def supervise(self) -> int:
        """Restarts children that die until a signal comes; returns the exit code to stop with
        (non-zero when a child keeps crashing)."""
        while not self.stopping:
            for child in self.children:
                if child.proc.poll() is not None and not self.stopping:
                    code = self.restart(child)
                    if code is not None:
                        return code
            time.sleep(0.25)
        return 0

    def restart(self, child: Child) -> int | None:
        code = child.proc.returncode
        quick = time.monotonic() - child.started < RESTART_WINDOW_S
        child.quick_exits = child.quick_exits + 1 if quick else 0
        if child.quick_exits > MAX_QUICK_RESTARTS:
            self.say(f"pagedserve: {child.name} exited with code {code}, {child.quick_exits} "
                     f"times within {RESTART_WINDOW_S:.0f} s of starting; stopping")
            return code or 1
        # Tensor-parallel ranks share collectives: one lost rank leaves the others stuck in them
        # (the ranks of its own replica: the others' run on).
        group = [c for c in self.children if is_worker(c) and c.replica == child.replica] \
            if is_worker(child) else [child]
        self.say(f"pagedserve: {child.name} exited with code {code}; restarting "
                 + ", ".join(c.name for c in group))
        for member in group:
            if member.proc.poll() is None:
                member.proc.kill()
                member.proc.wait()
        for member in group:
            member.proc, member.started = self.spawn(member.cmd, member.env), time.monotonic()
            self.say(f"pagedserve: started {member.name} (pid {member.proc.pid})")
        return None

    def on_signal(self, signum, frame) -> None:
        self.stopping = True
        if not self.serving:
            raise KeyboardInterrupt

    def stop_all(self) -> bool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return self.stop_children()

    def stop_children(self) -> bool:
        """Router first (it stops taking requests and lets those in flight finish), then the
        scheduler, then the workers: nothing goes away while the process in front of it still
        has work for it. Returns whether every child exited with 0. Leaves signal handlers
        alone, so a library (pagedserve.LLM) can call it from any thread of its host process."""
        clean = True
        for child in reversed(self.children):
            proc = child.proc
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.args.shutdown_timeout + 5)
                except subprocess.TimeoutExpired:
                    self.say(f"pagedserve: {child.name} did not stop; killing it")
                    proc.kill()
                    proc.wait()
            self.say(f"pagedserve: {child.name} exited with code {proc.returncode}")
            clean = clean and proc.returncode == 0
        return clean


def is_worker(child: Child) -> bool:
    return " worker " in f" {child.name} "


def served_name(a) -> str:
    """The model name the API answers to, as the scheduler chooses it: --served-model-name, else
    the model directory's name; a GGUF file is served under its --tokenizer directory's name (the
    worker reports that directory as the model's path)."""
    path = a.tokenizer if a.model.endswith(".gguf") and getattr(a, "tokenizer", None) else a.model
    return a.served_model_name or os.path.basename(os.path.normpath(path))
