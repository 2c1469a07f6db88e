"""The public gRPC service: Generate, Abort, GetModelInfo, GetStats, plus health and reflection."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc

from . import validation
from .auth import ApiKeyInterceptor
from .engine import DONE, Engine
from .scheduler import QueueFull
from .workers import WorkerLost

log = logging.getLogger("scheduler.service")


class SchedulerService(pbgrpc.SchedulerServicer):
    def __init__(self, engine: Engine, model_info: pb.ModelInfo):
        self.engine = engine
        self.model_info = model_info
        # Generate calls not yet ended: the requests a shutdown lets finish.
        self.generating = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        self.generating += 1
        self.idle.clear()
        try:
            async with contextlib.aclosing(self.generate(request, context)) as replies:
                async for reply in replies:
                    yield reply
        finally:
            self.generating -= 1
            if not self.generating:
                self.idle.set()

    async def generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            params = validation.check(request, self.model_info, self.engine.scheduler.kv)
        except validation.InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not self.engine.healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is serving; retry later")
        await self.check_structured_output(params, context)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.engine.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id: {request_id!r} is already in flight")
        try:
            queue = self.engine.add(request_id, list(request.prompt_token_ids), params)
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is DONE:
                    finished = True
                    return
                if isinstance(item, Exception):
                    finished = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                yield item
        finally:
            if not finished:
                # The client cancelled, its deadline passed, or it went away: give the blocks back.
                log.info("request %s cancelled by its client", request_id)
                self.engine.abort(request_id)

    async def check_structured_output(self, params: pb.SamplingParams, context) -> None:
        """A constraint that does not compile is refused here, before it is queued: a step
        never fails on it. The worker compiles it (the scheduler holds no tokenizer)."""
        if not params.HasField("structured_outputs"):
            return
        try:
            error = await self.engine.workers.check_structured_output(params.structured_outputs)
        except WorkerLost as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"structured_outputs: {error}")

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.engine.abort(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return self.model_info

    async def GetStats(self, request, context) -> pb.SchedulerStats:
        return self.engine.stats()


def build_server(service: SchedulerService, address: str,
                 api_key: str | None = None) -> tuple[grpc.aio.Server, health.HealthServicer]:
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    pbgrpc.add_SchedulerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Scheduler"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    server.add_insecure_port(address)
    return server, health_servicer


STATUS_GRACE_S = 1.0  # for the last replies and statuses of calls that have just ended


async def drain(server: grpc.aio.Server, service: SchedulerService, timeout: float) -> None:
    """Stops taking calls, lets the Generate calls in flight finish (at most `timeout` seconds),
    then ends the server. Returns as soon as no Generate call is left: other calls a client may
    keep open (a health Watch, a reflection stream) are no request in flight, and are cancelled."""
    stopping = asyncio.ensure_future(server.stop(grace=timeout))  # refuses new calls from now on
    idle = asyncio.ensure_future(service.idle.wait())
    await asyncio.wait([stopping, idle], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    if service.generating:
        log.warning("%d requests still in flight after %.0f s: cancelling them", service.generating,
                    timeout)
    await server.stop(grace=STATUS_GRACE_S)
    await stopping


# How long a worker may take to answer a health check before it counts as lost. Generous: a
# worker deep in a long step on a busy machine answers late, and failing it fails every request
# in flight; a worker that dies is noticed at once anyway (its Execute stream breaks).
HEALTH_TIMEOUT_S = 10.0


async def watch_health(engine: Engine, health_servicer, interval: float = 1.0) -> None:
    """Mirrors the workers' health into the scheduler's own health status, once a second."""
    service = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name
    while True:
        ok = engine.healthy and await engine.workers.healthy(timeout=HEALTH_TIMEOUT_S)
        if engine.healthy and not ok:
            log.error("a worker stopped answering health checks")
            engine.lose_workers()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", service):
            await health_servicer.set(name, status)
        await asyncio.sleep(interval)
