"""Which replica a request goes to (`--routing-policy`), among the healthy ones
(router/replicas.py hands a policy only those).

- round_robin: each in turn.
- least_load: the one with the fewest of this router's requests in flight.
- session: a request header (--session-header, default x-session-id) picks the replica by
  consistent hashing, so a conversation stays where its KV cache is and a replica that leaves or
  joins moves only its share of sessions; without the header, least_load.
- cache_aware (the default with more than one replica): where the longest prefix of the prompt
  was sent before, by a radix tree of token ids per replica (router/prefix_tree.py), when that
  prefix is at least --cache-threshold of the prompt; else the replica whose tree is smallest
  (the most room in its cache). Unless the load is out of balance: when the busiest replica has
  more than --balance-abs-threshold requests more than the idlest and more than
  --balance-rel-threshold times as many, the idlest gets it. SGLang's router has these three
  knobs (cache_threshold, balance_abs_threshold, balance_rel_threshold); the code is our own.

A replica here is anything with `address` (str) and `load` (requests in flight, int).
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

from pagedserve.router.prefix_tree import PrefixTree

POLICIES = ("cache_aware", "least_load", "round_robin", "session")


class Replica(Protocol):
    address: str
    load: int


@dataclass
class Route:
    """What a policy knows of a request."""

    token_ids: Sequence[int]       # the prompt, after templating
    session: str | None = None     # the session header's value, if any


class RoundRobin:
    def __init__(self):
        self.turn = 0

    def choose(self, replicas: Sequence[Replica], route: Route) -> Replica:
        replica = replicas[self.turn % len(replicas)]
        self.turn += 1
        return replica

    def routed(self, replica: Replica, route: Route) -> int | None:
        """Told where a request went; returns the prompt tokens the replica probably has cached
        (None: this policy does not know)."""
        return None

    def forget(self, address: str) -> None:
        """The replica at `address` left the set."""


class LeastLoad(RoundRobin):
    def choose(self, replicas: Sequence[Replica], route: Route) -> Replica:
        # Ties go round: idle replicas share a trickle of requests instead of the first taking all.
        start = self.turn % len(replicas)
        self.turn += 1
        turned = [*replicas[start:], *replicas[:start]]
        return min(turned, key=lambda r: r.load)


def ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Session(LeastLoad):
    VIRTUAL_NODES = 64  # points per replica on the ring: an even share each

    def choose(self, replicas: Sequence[Replica], route: Route) -> Replica:
        if route.session is None:
            return super().choose(replicas, route)
        ring = sorted((ring_hash(f"{r.address}#{k}"), r.address)
                      for r in replicas for k in range(self.VIRTUAL_NODES))
        by_address = {r.address: r for r in replicas}
        i = bisect.bisect(ring, (ring_hash(route.session), "")) % len(ring)
        return by_address[ring[i][1]]


class CacheAware(LeastLoad):
    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.5, max_tree_size: int = 1 << 20):
        super().__init__()
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.trees: dict[str, PrefixTree] = {}

    def tree(self, address: str) -> PrefixTree:
        if address not in self.trees:
            self.trees[address] = PrefixTree(self.max_tree_size)
        return self.trees[address]

    def imbalanced(self, replicas: Sequence[Replica]) -> bool:
        loads = [r.load for r in replicas]
        high, low = max(loads), min(loads)
        return (high - low > self.balance_abs_threshold
                and high > low * self.balance_rel_threshold)

    def choose(self, replicas: Sequence[Replica], route: Route) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        if self.imbalanced(replicas):
            return super().choose(replicas, route)
        tokens = route.token_ids
        matches = [(self.tree(r.address).match(tokens), r) for r in replicas]
        best, replica = max(matches, key=lambda m: (m[0], -m[1].load))
        if tokens and best / len(tokens) >= self.cache_threshold:
            return replica
        # Nothing much cached anywhere: where the tree is smallest, the least loaded of those.
        return min(replicas, key=lambda r: (self.tree(r.address).size, r.load))

    def routed(self, replica: Replica, route: Route) -> int | None:
        return self.tree(replica.address).insert(route.token_ids)

    def forget(self, address: str) -> None:
        self.trees.pop(address, None)


def make_policy(name: str, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                balance_rel_threshold: float = 1.5, max_tree_size: int = 1 << 20):
    """The policy called `name` (one of POLICIES). Raises ValueError for another name."""
    if name == "cache_aware":
        return CacheAware(cache_threshold, balance_abs_threshold, balance_rel_threshold,
                          max_tree_size)
    policies = {"least_load": LeastLoad, "round_robin": RoundRobin, "session": Session}
    if name not in policies:
        raise ValueError(f"routing policy {name!r}: expected one of {', '.join(POLICIES)}")
    return policies[name]()
