"""A scheduler's graceful shutdown (SIGTERM) with requests in flight on a GenerateStream call: they
run to their end, while a new request on the same call is refused with UNAVAILABLE; then the
process exits 0 without waiting out --shutdown-timeout. A real `python -m pagedserve.scheduler` against a
worker without a model that takes 50 ms a step (so a request outlasts the signal)."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.entrypoints.launcher import free_port
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc
from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.v1 import worker_pb2_grpc as wgrpc
from tests.helpers.stack import ROOT
from tests.helpers.fake_worker import RecordingWorker

WORKER_INFO = wpb.WorkerInfo(rank=0, world_size=1, model_path="/fake-model", num_kv_blocks=64, block_size=16,
                             max_model_len=512, vocab_size=1000, device="cpu", dtype="float32")
STEP_S = 0.05
MAX_TOKENS = 60  # 3 s of steps


class SlowWorker(RecordingWorker):
    def Execute(self, request_iterator, context):
        for result in super().Execute(request_iterator, context):
            time.sleep(STEP_S)
            yield result


def serving(channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_for(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s"
        time.sleep(0.05)


def test_sigterm_lets_the_calls_requests_finish_and_refuses_new_ones(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    wgrpc.add_WorkerServicer_to_server(SlowWorker(WORKER_INFO), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    worker_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port = free_port()
    log = open(tmp_path / "scheduler.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.scheduler", "--worker-addrs",
                             f"127.0.0.1:{worker_port}", "--port", str(port),
                             "--shutdown-timeout", "120"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    outgoing: queue.Queue = queue.Queue()
    try:
        wait_for(lambda: serving(channel), 60)
        call = pbgrpc.SchedulerStub(channel).GenerateStream(iter(outgoing.get, None), timeout=300)
        outgoing.put(pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="in-flight", prompt_token_ids=[11, 12, 13],
            params=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))))
        messages = iter(call)
        tokens = list(next(messages).responses[0].token_ids)  # it runs
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not serving(channel), 30)
        time.sleep(0.5)  # from health NOT_SERVING to refusing requests: no await between
        outgoing.put(pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="too-late", prompt_token_ids=[11, 12], params=pb.SamplingParams(max_tokens=2))))
        errors, finished = {}, []
        with pytest.raises(grpc.RpcError) as ended:  # once nothing is in flight
            for message in messages:
                tokens += [t for r in message.responses if r.request_id == "in-flight"
                           for t in r.token_ids]
                errors.update((e.request_id, e) for e in message.errors)
                finished += message.finished
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # as scheduler.proto says
        assert finished == ["in-flight"] and len(tokens) == MAX_TOKENS
        assert errors["too-late"].code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "shutting down" in errors["too-late"].message
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 60  # not the 120 s of --shutdown-timeout
    finally:
        outgoing.put(None)
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop(grace=None)
        log.close()
