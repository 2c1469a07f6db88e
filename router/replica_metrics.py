"""The router's figures per replica (router/replicas.py) at /metrics, read from the replica set at
each scrape: requests routed, their prompt tokens and how many of those the routing policy found
already sent to that replica (the prefix-match rate is the ratio of the two counters), requests in
flight, health, and the requests resumed after their scheduler went away."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.router.replicas import ReplicaSet

PREFIX = "pagedserve_router_"
LABEL = ["replica"]


class ReplicaCollector:
    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas

    def collect(self):
        members = list(self.replicas.replicas.values())
        per_replica = (
            (CounterMetricFamily, "replica_requests", "Requests routed to the replica",
             lambda r: r.requests),
            (CounterMetricFamily, "replica_prompt_tokens", "Prompt tokens routed to the replica",
             lambda r: r.prompt_tokens),
            (CounterMetricFamily, "replica_prefix_match_tokens",
             "Of those, tokens of a prefix sent to the replica before (cache_aware)",
             lambda r: r.matched_tokens),
            (GaugeMetricFamily, "replica_requests_in_flight",
             "This router's requests running on the replica", lambda r: r.load),
            (GaugeMetricFamily, "replica_healthy", "1 when the replica passed its last check",
             lambda r: float(r.healthy)),
        )
        for kind, name, doc, value in per_replica:
            family = kind(PREFIX + name, doc, labels=LABEL)
            for replica in members:
                family.add_metric([replica.address], value(replica))
            yield family
        yield GaugeMetricFamily(PREFIX + "healthy_replicas", "Replicas that passed their last "
                                "check", value=sum(r.healthy for r in members))
        yield CounterMetricFamily(PREFIX + "request_resumptions", "Requests re-sent as a "
                                  "continuation after their scheduler went away",
                                  value=self.replicas.resumptions)
