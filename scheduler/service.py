"""The public gRPC service: Generate, GenerateStream, Abort, GetModelInfo, GetStats, plus health
and reflection."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc

from .admission import InFlight, Refused, accept
from .auth import ApiKeyInterceptor
from .engine import Engine
from .outboxes import END_OF_REQUEST, RequestQueue
from .streams import StreamSession

log = logging.getLogger("pagedserve.scheduler.service")


class SchedulerService(pbgrpc.SchedulerServicer):
    def __init__(self, engine: Engine, model_info: pb.ModelInfo):
        self.engine = engine
        self.model_info = model_info
        self.in_flight = InFlight()  # what a shutdown lets finish: Generate's and GenerateStream's

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        self.in_flight.enter()
        try:
            async with contextlib.aclosing(self.generate(request, context)) as replies:
                async for reply in replies:
                    yield reply
        finally:
            self.in_flight.leave()

    async def generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        queue = RequestQueue()
        try:
            request_id = await accept(self.engine, self.model_info, request, queue)
        except Refused as e:
            await context.abort(e.code, e.message)
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is END_OF_REQUEST:
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

    async def GenerateStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """Many requests on one call (scheduler.proto); the work is StreamSession's."""
        session = StreamSession(self.engine, self.model_info, self.in_flight)
        async with contextlib.aclosing(session.replies(request_iterator)) as replies:
            async for reply in replies:
                yield reply

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.engine.abort(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return self.model_info

    async def GetStats(self, request, context) -> pb.SchedulerStats:
        return self.engine.stats()


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
    # The router's GenerateStream call stays open while nothing runs, and its channel pings every
    # 30 s (router/client.py); gRPC's default (pings no closer than 5 min while no data flows)
    # would answer with GOAWAY "too_many_pings" and break the idle call every ~2 minutes.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def build_server(service: SchedulerService, address: str,
                 api_key: str | None = None) -> tuple[grpc.aio.Server, health.HealthServicer]:
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
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
    """Stops taking calls and requests, lets the requests in flight finish (at most `timeout`
    seconds), then ends the server. Returns as soon as no request is left: calls a client may keep
    open (a GenerateStream, a health Watch, a reflection stream) are no request in flight, and are
    cancelled."""
    in_flight = service.in_flight
    in_flight.accepting = False  # a GenerateStream open already refuses new requests from now on
    stopping = asyncio.ensure_future(server.stop(grace=timeout))  # refuses new calls from now on
    idle = asyncio.ensure_future(in_flight.idle.wait())
    await asyncio.wait([stopping, idle], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    if in_flight.count:
        log.warning("%d requests still in flight after %.0f s: cancelling them", in_flight.count,
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
