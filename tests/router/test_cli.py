"""`python -m pagedserve.router`'s command line: flags, the API key, CORS, waiting for its scheduler."""

import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.router_fixtures import EOS, eventually, free_port

# ----- the command line ----------------------------------------------------------------------------

@pytest.mark.stack  # starts a process
def test_cli_waits_for_the_scheduler(harness, model_dir):
    """`python -m pagedserve.router` started before its scheduler: it retries, then serves."""
    from tests.helpers.fake_scheduler import FakeScheduler, FakeSchedulerServer

    scheduler = FakeSchedulerServer(FakeScheduler(vocab_size=49152, eos_token_ids=[EOS],
                                                  model_path=str(model_dir)), port=free_port())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.router", "--scheduler-addr",
                             scheduler.address, "--port", str(port), "--host", "127.0.0.1",
                             "--log-level", "warning"])
    try:
        time.sleep(1.0)
        harness.loop.run(scheduler.start())
        eventually(lambda: proc.poll() is None and ok(f"http://127.0.0.1:{port}/health"), 60)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert models[0]["id"] == model_dir.name  # no name from the scheduler: the dir's
    finally:
        proc.terminate()
        proc.wait(60)
        harness.loop.run(scheduler.stop())


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
