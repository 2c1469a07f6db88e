"""`pagedserve serve` SIGKILLed (no chance to stop its children): the worker, scheduler and router
notice that their launcher is gone and shut down by themselves instead of living on as orphans."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pagedserve.healthcheck import http_ok
from pagedserve.launcher import free_port
from tests import tiny_models
from tests.live_stack import children, poll
from tests.stack import ROOT


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return status != "Z"


def test_children_stop_when_the_launcher_is_killed(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    tiny_models.build("llama", model_dir)
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(port), "--grpc-port", str(free_port())],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(lambda: http_ok(f"http://127.0.0.1:{port}/health") or launcher.poll() is not None, timeout=180)
        assert launcher.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        pids = children(launcher.pid)
        assert set(pids) == {"worker", "scheduler", "router"}
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        poll(lambda: not any(alive(pid) for pid in pids.values()), timeout=30)
    finally:
        for pid in children(launcher.pid).values():
            os.kill(pid, signal.SIGKILL)
