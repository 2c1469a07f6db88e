"""Prometheus metrics of the router (HTTP traffic, tokens, time to first token), and the
scheduler's queue and KV cache figures, fetched when /metrics is scraped."""
from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.v1 import scheduler_pb2 as pb

log = logging.getLogger("router")

PREFIX = "pagedserve_router_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        # A registry of its own: tests build several apps in one process.
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests answered",
                                     ["method", "path", "status"], registry=r)
        self.http_latency = Histogram(PREFIX + "http_request_duration_seconds",
                                      "Time from request to the end of the response",
                                      ["method", "path"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "Generations in progress", registry=r)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "Time from request to its first generated tokens",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens sent", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated",
                                         registry=r)
        self.finished = Counter(PREFIX + "choices_finished", "Choices finished, by reason",
                                ["finish_reason"], registry=r)
        self.scheduler = {name: Gauge(f"pagedserve_scheduler_{name}", f"SchedulerStats.{name}",
                                      registry=r)
                          for name in pb.SchedulerStats.DESCRIPTOR.fields_by_name}

    async def render(self, request: Request) -> Response:
        try:
            stats = await request.app.state.client.stats(timeout_s=1.0)
            for name, gauge in self.scheduler.items():
                gauge.set(float(getattr(stats, name)))
        except grpc.aio.AioRpcError as err:
            log.warning("scheduler stats unavailable for /metrics: %s", err.code().name)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route's template (not its raw path, whose
    values would make one time series per model name or typo)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "other")
            self.metrics.http_requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.http_latency.labels(scope["method"], path).observe(
                time.perf_counter() - start)
