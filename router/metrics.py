"""Prometheus metrics at /metrics, under vLLM's names with the prefix `pagedserve:` (so vLLM's
dashboards work after a rename), or `vllm:` itself with `--metrics-prefix vllm` (so routers and
autoscalers written for vLLM read them as they are), plus the router's own HTTP traffic.

Request latencies are measured in the router, where the client sees them: each Run reports them
through the RequestMetrics interface (router/request_metrics.py), which Metrics implements. Queue,
KV cache and token figures belong to the scheduler: each scrape fetches them with GetStats, so
they are never stale, and they are simply absent from a scrape that finds the scheduler down.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import grpc
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.request_metrics import RequestMetrics

log = logging.getLogger("pagedserve.router")

PREFIX = "pagedserve:"  # pagedserve's own metrics, which vLLM has no name for, keep it always
METRICS_PREFIXES = ("pagedserve", "vllm")  # --metrics-prefix: what vLLM's names are under
ROUTER_PREFIX = "pagedserve_router_"
MODEL_LABEL = ["model_name"]
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 640)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
# vLLM's finish reasons (FINISH_REASON_STRINGS): their request_success series exist from start-up,
# at zero, so dashboards and alerts see them before the first request ends.
FINISHED_REASONS = ("stop", "length", "abort", "error")


class SchedulerCollector:
    """The scheduler's figures from the latest GetStats, in vLLM's metric names."""

    def __init__(self, prefix: str = PREFIX):
        self.stats: pb.SchedulerStats | None = None
        self.model_name = ""
        self.prefix = prefix

    def collect(self):
        s = self.stats
        if s is None:
            return
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield self.gauge("num_requests_running", "Requests in the running batch",
                         s.num_requests_running)
        yield self.gauge("num_requests_waiting", "Requests waiting to be scheduled",
                         s.num_requests_waiting)
        yield self.gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)",
                         usage)
        yield self.counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                           s.prefix_cache_queries)
        yield self.counter("prefix_cache_hits", "Prompt tokens found in the prefix cache",
                           s.prefix_cache_hits)
        yield self.counter("num_preemptions", "Sequences preempted for lack of KV blocks",
                           s.num_preemptions)
        yield self.counter("prompt_tokens", "Prompt tokens admitted", s.prompt_tokens_total)
        yield self.counter("generation_tokens", "Tokens generated", s.generation_tokens_total)
        yield self.counter("num_requests_resumed", "Requests held through a lost worker and "
                           "recomputed instead of failing", s.num_requests_resumed, PREFIX)
        if s.max_loras:
            yield lora_requests_info(s)
        if s.spec_decode_num_accepted_tokens_per_pos:  # one per draft position: speculation is on
            yield from self.spec_decode(s)

    def spec_decode(self, s: pb.SchedulerStats):
        """vLLM's speculative decoding counters; acceptance rate = accepted / draft tokens."""
        yield self.counter("spec_decode_num_drafts", "Sequence-steps that verified draft tokens",
                           s.spec_decode_num_drafts)
        yield self.counter("spec_decode_num_draft_tokens", "Draft tokens proposed",
                           s.spec_decode_num_draft_tokens)
        yield self.counter("spec_decode_num_accepted_tokens", "Draft tokens accepted",
                           s.spec_decode_num_accepted_tokens)
        family = CounterMetricFamily(self.prefix + "spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted at each draft position",
                                     labels=MODEL_LABEL + ["position"])
        for position, value in enumerate(s.spec_decode_num_accepted_tokens_per_pos):
            family.add_metric([self.model_name, str(position)], value)
        yield family

    def gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.prefix + name, doc, labels=MODEL_LABEL)
        family.add_metric([self.model_name], value)
        return family

    def counter(self, name: str, doc: str, value: float,
                prefix: str | None = None) -> CounterMetricFamily:
        family = CounterMetricFamily((prefix or self.prefix) + name, doc, labels=MODEL_LABEL)
        family.add_metric([self.model_name], value)
        return family


def lora_requests_info(s: pb.SchedulerStats) -> GaugeMetricFamily:
    """vLLM's lora_requests_info: the adapters with running and with waiting requests as
    comma-separated labels, the value the time of the figures (seconds since the epoch)."""
    family = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on LoRA requests",
                               labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    running = ",".join(a.lora_name for a in s.lora_requests if a.running)
    waiting = ",".join(a.lora_name for a in s.lora_requests if a.waiting)
    family.add_metric([running, waiting, str(s.max_loras)], time.time())
    return family


class Metrics(RequestMetrics):
    def __init__(self, metrics_prefix: str = "pagedserve"):
        """metrics_prefix: one of METRICS_PREFIXES, the prefix of vLLM's names (before the colon)."""
        if metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(f"metrics_prefix: {metrics_prefix!r} is not one of {METRICS_PREFIXES}")
        prefix = metrics_prefix + ":"
        # A registry of its own: tests build several apps in one process.
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(ROUTER_PREFIX + "http_requests", "HTTP requests answered",
                                     ["method", "path", "status"], registry=r)
        self.http_latency = Histogram(ROUTER_PREFIX + "http_request_duration_seconds",
                                      "Time from request to the end of the response",
                                      ["method", "path"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(ROUTER_PREFIX + "requests_in_flight",
                               "Generations the router is serving", registry=r)
        self._ttft = Histogram(prefix + "time_to_first_token_seconds",
                               "Time from the request's arrival to its first token",
                               MODEL_LABEL, buckets=TTFT_BUCKETS, registry=r)
        self._itl = Histogram(prefix + "inter_token_latency_seconds",
                              "Time between two successive outputs of a sequence",
                              MODEL_LABEL, buckets=ITL_BUCKETS, registry=r)
        self._e2e = Histogram(prefix + "e2e_request_latency_seconds",
                              "Time from the request's arrival to its last token",
                              MODEL_LABEL, buckets=E2E_BUCKETS, registry=r)
        self._success = Counter(prefix + "request_success", "Sequences finished, by reason",
                                MODEL_LABEL + ["finished_reason"], registry=r)
        self.scheduler = SchedulerCollector(prefix)
        r.register(self.scheduler)

    def bind(self, model_name: str) -> None:
        """Labels every model metric with the served name, known once the scheduler answered
        (before that no request is served)."""
        self.scheduler.model_name = model_name
        self.time_to_first_token = self._ttft.labels(model_name)
        self.inter_token_latency = self._itl.labels(model_name)
        self.e2e_latency = self._e2e.labels(model_name)
        self._model_name = model_name
        for reason in FINISHED_REASONS:
            self._success.labels(model_name, reason)

    # ----- RequestMetrics: what each Run reports (router/request_metrics.py) -------------------

    def request_started(self) -> None:
        self.in_flight.inc()

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def request_finished(self, seconds: float, finish_reasons: Sequence[str]) -> None:
        self.in_flight.dec()
        self.e2e_latency.observe(seconds)
        for reason in finish_reasons:
            self._success.labels(self._model_name, reason).inc()

    async def render(self, request: Request) -> Response:
        # Summed over the replicas that answer (router/replicas.py).
        self.scheduler.stats, _ = await request.app.state.frontend.replicas.stats()
        if self.scheduler.stats is None:
            log.warning("scheduler stats unavailable for /metrics: no scheduler answers")
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
