"""The worker's gRPC face: the Worker service (Execute, GetWorkerInfo) and grpc.health.v1."""
import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.v1 import worker_pb2, worker_pb2_grpc
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.step_loop import StepLoop

log = logging.getLogger(__name__)

SERVICE_NAME = "pagedserve.v1.Worker"
MAX_MESSAGE_BYTES = 64 << 20  # a plan re-adding many preempted long sequences is large


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runner: ModelRunner, step_loop: StepLoop | None = None):
        self.runner = runner
        # Where steps run: the worker's main thread (step_loop.py says why), or, without a loop
        # (in-process tools), the gRPC handler's own thread.
        self.run = step_loop.call if step_loop is not None else (lambda fn, *args: fn(*args))
        # One persistent batch and one KV cache: steps from two streams must never interleave.
        self.lock = threading.Lock()
        self.stream_id = 0  # the newest Execute stream's; older ones are superseded

    def Execute(self, request_iterator, context):
        # A new stream is a scheduler that (re)started: whatever the old one left in the batch
        # belongs to requests that no longer exist, and its block ids mean nothing any more.
        with self.lock:
            self.stream_id += 1
            mine = self.stream_id
            self.runner.batch.clear()
            self.runner.poolers.clear()
        log.info("Execute stream %d opened by %s: batch reset", mine, context.peer())
        for plan in request_iterator:
            with self.lock:
                if mine != self.stream_id:
                    context.abort(grpc.StatusCode.ABORTED, "superseded by a newer Execute stream")
                result = self.run(self.runner.execute, plan)
            yield result
        log.info("Execute stream %d closed by %s", mine, context.peer())

    def GetWorkerInfo(self, request, context):
        return self.runner.worker_info()

    def CheckStructuredOutput(self, request, context):
        # On the handler's thread: compiling must not wait for (or hold up) the steps.
        return worker_pb2.StructuredOutputCheck(error=self.runner.grammars.check(request))


def build_server(runner: ModelRunner, address: str,
                 step_loop: StepLoop | None = None) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(runner, step_loop), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen on {address} (port in use?)")
    # The model is loaded before the server is built, so the worker is SERVING as soon as it listens.
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer
