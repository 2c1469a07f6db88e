"""Every process of `pagedserve serve` ends when it should. The launcher SIGKILLed (no chance to
stop its children) while the worker loads its weights, while the server is idle, in the middle of
a long generation, or after its scheduler died: the worker, scheduler and router notice that their
launcher is gone and exit by themselves instead of living on as orphans. SIGTERM on an idle
server ends it at once, not after --shutdown-timeout; a stream still running when that time is up is
cut with one warning line. And a process stuck in native code, where
Python's own signal handler never runs, still ends by its deadline."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import tiny_models
from tests.helpers.live_stack import children, is_zombie, poll
from tests.helpers.stack import ROOT, Stack, launch, run_stack

# Generous for a loaded machine: an orphan's own deadline (parent_watch.ORPHAN_EXIT_S) is 10 s.
GONE_WITHIN_S = 60.0
SMALL_CACHE = ("--kv-cache-memory-bytes", str(64 << 20))  # not 2 GiB of zeros to write per stack


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A tiny Llama 64 layers deep: loading its weights takes a moment (a window to kill the
    launcher in) and a generation of thousands of tokens (4096 positions) runs for a while."""
    path = tmp_path_factory.mktemp("parent-watch") / "deep-tiny-llama"
    tiny_models.build("llama", path, num_hidden_layers=64, max_position_embeddings=4096)
    return path


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not is_zombie(pid)


def kill_launcher_then_wait_for(stack: Stack, pids: dict[str, int]) -> None:
    """SIGKILLs the launcher and asserts that every process in `pids` exits by itself."""
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait()
    killed = time.monotonic()
    try:
        while any(alive(pid) for pid in pids.values()):
            if time.monotonic() - killed > GONE_WITHIN_S:
                left = [role for role, pid in pids.items() if alive(pid)]
                pytest.fail(f"{', '.join(left)} still running {GONE_WITHIN_S:.0f} s after the "
                            f"launcher was killed:\n{stack.log()[-5000:]}")
            time.sleep(0.2)
        print(f"{', '.join(pids)}: all gone {time.monotonic() - killed:.1f} s after the launcher")
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_worker_loading_its_weights_exits_with_the_launcher(deep_model, tmp_path):
    stack = launch(deep_model, *SMALL_CACHE, log_dir=tmp_path)
    try:
        poll(lambda: "loading weights" in stack.log() or stack.proc.poll() is not None, 180,
             interval=0.02)
        pids = children(stack.proc.pid)
        assert set(pids) == {"worker"}, stack.log()[-3000:]  # the others start once it serves
        print("the worker was", "serving" if "worker listening" in stack.log() else "loading")
    finally:
        kill_launcher_then_wait_for(stack, children(stack.proc.pid))


def test_idle_server_exits_with_the_launcher(deep_model, tmp_path):
    with run_stack(deep_model, *SMALL_CACHE, log_dir=tmp_path) as stack:
        pids = children(stack.proc.pid)
        assert set(pids) == {"worker", "scheduler", "router"}
        kill_launcher_then_wait_for(stack, pids)


def test_server_mid_generation_exits_with_the_launcher(deep_model, tmp_path):
    with run_stack(deep_model, *SMALL_CACHE, log_dir=tmp_path) as stack, ThreadPoolExecutor(1) as pool:
        pids = children(stack.proc.pid)
        request = pb.GenerateRequest(prompt_token_ids=[5, 17, 300], params=pb.SamplingParams(
            max_tokens=4000, temperature=0, ignore_eos=True))
        replies = stack.scheduler.Generate(request, timeout=300)
        assert next(replies).token_ids  # running: the worker is stepping
        rest = pool.submit(list, replies)
        kill_launcher_then_wait_for(stack, pids)
        # Its client is not left hanging either: the request failed with the stack.
        with pytest.raises(grpc.RpcError):
            rest.result(timeout=30)


def test_workers_and_router_exit_with_the_launcher_after_the_scheduler(deep_model, tmp_path):
    with run_stack(deep_model, *SMALL_CACHE, log_dir=tmp_path) as stack:
        pids = children(stack.proc.pid)
        os.kill(stack.proc.pid, signal.SIGSTOP)  # so that it does not restart the scheduler
        os.kill(pids["scheduler"], signal.SIGKILL)
        poll(lambda: not alive(pids["scheduler"]), 30)
        kill_launcher_then_wait_for(stack, pids)


def test_sigterm_on_an_idle_server_exits_without_waiting_for_the_drain(deep_model, tmp_path):
    """Nothing in flight, so nothing to wait for: not --shutdown-timeout (120 s here), even with
    a monitoring client's health Watch open on the scheduler (a call that is no request)."""
    with run_stack(deep_model, *SMALL_CACHE, "--shutdown-timeout", "120", log_dir=tmp_path) as stack:
        pids = children(stack.proc.pid)
        watch = health_pb2_grpc.HealthStub(stack.channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(timeout=GONE_WITHIN_S) == 0, stack.log()[-3000:]
        print(f"pagedserve serve exited {time.monotonic() - started:.1f} s after SIGTERM")
        assert not any(alive(pid) for pid in pids.values())
        watch.cancel()


def test_a_stream_cut_at_the_shutdown_timeout_is_one_warning_and_every_process_exits_0(deep_model, tmp_path):
    """SIGTERM while a long generation streams, with --shutdown-timeout 2: the router cuts the
    stream when the time is up, says so in one line (no CancelledError traceback), the scheduler
    aborts the request, and every process exits 0."""
    with run_stack(deep_model, *SMALL_CACHE, "--shutdown-timeout", "2", log_dir=tmp_path) as stack:
        body = {"model": deep_model.name, "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{stack.base_url}/completions", json=body, timeout=120) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            stack.proc.send_signal(signal.SIGTERM)
            try:
                rest = list(lines)
            except httpx.HTTPError:
                rest = []  # the connection closed in the middle of a chunk
            assert "data: [DONE]" not in rest  # cut off, not finished
        assert stack.proc.wait(timeout=GONE_WITHIN_S) == 0, stack.log()[-3000:]
        log = stack.log()
        assert "request cut off: still running when --shutdown-timeout ran out" in log
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        assert "WARNING uvicorn.error [-] Cancel 1 running task(s)" in log  # not an ERROR: the flag at work
        assert "FINISH_REASON_ABORT" in log  # the scheduler gave its blocks back


# A main thread deadlocked in native code (a mutex locked twice through ctypes, which lets go of
# the GIL): Python's own handler for SIGTERM never gets to run there. The handler ends nothing
# either way, so a SIGTERM that lands just before the deadlock (after "stuck" is printed) cannot
# end the process on its own: only the deadline can.
STUCK = """
import ctypes, signal, sys
from pagedserve.parent_watch import exit_within_after_signal
signal.signal(signal.SIGTERM, lambda *_: None)
exit_within_after_signal(1.0)
print("stuck", flush=True)
libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)
libc.pthread_mutex_lock(mutex)
libc.pthread_mutex_lock(mutex)
"""


def test_a_process_stuck_in_native_code_still_ends_after_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", STUCK], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "stuck\n"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=GONE_WITHIN_S)
    finally:
        proc.kill()
    # Ended by the deadline (exit status 1), with the stack of the thread that held it up.
    assert proc.returncode == 1
    assert "Timeout (0:00:01)!" in stderr
    assert 'File "<string>", line 9' in stderr  # the second pthread_mutex_lock
