"""What a front end of the scheduler measures of the requests it serves, as an explicit interface.

A Run (router/run.py) reports to the RequestMetrics its front end was given: the router's
Prometheus metrics (router/metrics.py:Metrics) implement it; the offline LLM, which nobody scrapes,
passes NoMetrics. Times are seconds, measured from the request's arrival (time.perf_counter()).
"""
from __future__ import annotations

from typing import Protocol, Sequence


class RequestMetrics(Protocol):
    def request_started(self) -> None:
        """A request's scheduler calls were sent: it is in flight until request_finished."""

    def first_token(self, seconds: float) -> None:
        """The request's first output came, `seconds` after its arrival."""

    def inter_token(self, seconds: float) -> None:
        """A sequence's output came `seconds` after its previous one (vLLM's inter-token latency:
        once per output after a sequence's first)."""

    def request_finished(self, seconds: float, finish_reasons: Sequence[str]) -> None:
        """The request ended, `seconds` after its arrival, however it ended; one finish reason
        per sequence ("stop", "length" or "abort")."""


class NoMetrics(RequestMetrics):
    """Records nothing: for a front end whose requests nobody measures (the offline LLM)."""

    def request_started(self) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        pass

    def request_finished(self, seconds: float, finish_reasons: Sequence[str]) -> None:
        pass
