"""The schedulers this router sends requests to (data parallel replicas, each a scheduler and its
workers), their health, and the choice of one per request.

Every `health_interval_s` each replica is asked GetStats (a cheap RPC every scheduler serves); it
is healthy when it answers and reports its workers healthy. Requests go to healthy replicas only,
chosen by the routing policy (router/routing.py); a replica that fails a check, or whose
GenerateStream call breaks, gets none until a check finds it healthy again. With one replica, or
none healthy, every replica is a candidate: the request then waits for a connection as a router
with one scheduler always did (router/client.py) and fails with 503 if none comes.

Names among the addresses are resolved again every `dns_refresh_s` (router/discovery.py): new
addresses become replicas, vanished ones are dropped (their requests in flight break, and the
router resumes them elsewhere: router/generation.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from itertools import zip_longest
from typing import Sequence

import grpc

from pagedserve.router import discovery
from pagedserve.router.client import SchedulerClient
from pagedserve.router.routing import Route, make_policy
from pagedserve.router.settings import Settings
from pagedserve.v1 import scheduler_pb2 as pb

log = logging.getLogger("pagedserve.router")

# Every count of SchedulerStats adds up over replicas (workers_healthy, the one flag, is any's):
# read from the message itself, so a count added to the proto is summed without a word here.
# Settings rather than counts (the same on every replica) are not added up but taken once.
SETTINGS = ("max_loras",)
SUMMED = tuple(f.name for f in pb.SchedulerStats.DESCRIPTOR.fields
               if f.type not in (f.TYPE_BOOL, f.TYPE_MESSAGE) and not f.is_repeated
               and f.name not in SETTINGS)
SUMMED_PER_INDEX = tuple(f.name for f in pb.SchedulerStats.DESCRIPTOR.fields
                         if f.is_repeated and f.type != f.TYPE_MESSAGE)


class Replica:
    """One scheduler: its gRPC client and what the router counts about it."""

    def __init__(self, address: str, client: SchedulerClient):
        self.address = address
        self.client = client
        self.healthy = False
        self.load = 0                # this router's requests in flight on it
        self.requests = 0            # requests routed to it, ever
        self.prompt_tokens = 0       # their prompt tokens
        self.matched_tokens = 0      # of those, the tokens the policy found sent before
        self.gone = False            # dropped from the set (DNS no longer lists it)


class ReplicaSet:
    def __init__(self, settings: Settings, clients: Sequence[SchedulerClient] = ()):
        """The replicas of settings.scheduler_addrs (else settings.scheduler_addr). `clients`:
        ready-made clients instead (one each, no DNS), for a caller that holds them."""
        self.settings = settings
        self.targets = discovery.split_targets(settings.scheduler_addrs or settings.scheduler_addr)
        self.replicas: dict[str, Replica] = {c.address: Replica(c.address, c) for c in clients}
        self.fixed = bool(clients)
        several = len(self.targets) > 1 or discovery.has_names(self.targets)
        name = settings.routing_policy or ("cache_aware" if several else "round_robin")
        self.policy = make_policy(name, settings.cache_threshold, settings.balance_abs_threshold,
                                  settings.balance_rel_threshold, settings.max_tree_size)
        self.policy_name = name
        self.resumptions = 0         # requests re-sent after their scheduler went away
        self.closed = False          # the router is shutting down: nothing more is resumed
        self._watcher: asyncio.Task | None = None

    @classmethod
    def of(cls, client: SchedulerClient) -> "ReplicaSet":
        """One replica, the given client: a caller that made its own SchedulerClient (no health
        checks run, so nothing is resumed)."""
        return cls(Settings(scheduler_addr=client.address, resume_timeout=0), [client])

    # ----- membership and health ----------------------------------------------------------------

    async def start(self) -> None:
        """Resolves the addresses, checks every replica once, and keeps checking in the
        background until close()."""
        if not self.fixed:
            await self.refresh()
        await self.check_all()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def new_client(self, address: str) -> SchedulerClient:
        s = self.settings
        return SchedulerClient(address, s.connect_timeout_s, s.api_key)

    async def refresh(self) -> None:
        """Resolves the addresses again: new ones join, vanished ones leave."""
        addresses = await discovery.resolve(self.targets)
        for address in addresses:
            if address not in self.replicas:
                self.replicas[address] = Replica(address, self.new_client(address))
                log.info("replica %s joined", address)
        for address in [a for a in self.replicas if a not in addresses]:
            replica = self.replicas.pop(address)
            replica.gone, replica.healthy = True, False
            self.policy.forget(address)
            log.warning("replica %s left (no longer resolved)", address)
            await replica.client.close()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))

    async def check(self, replica: Replica) -> pb.SchedulerStats | None:
        """Asks the replica GetStats; sets its health from the answer, which it returns (None:
        no answer)."""
        try:
            stats = await replica.client.stats(timeout_s=self.settings.health_timeout_s)
        except grpc.aio.AioRpcError:
            stats = None
        healthy = stats is not None and stats.workers_healthy and not replica.gone
        if healthy != replica.healthy:
            log.log(logging.INFO if healthy else logging.WARNING, "replica %s is %s",
                    replica.address, "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        return stats

    async def _watch(self) -> None:
        s = self.settings
        resolved = time.monotonic()
        names = not self.fixed and discovery.has_names(self.targets)
        while True:
            await asyncio.sleep(s.health_interval_s)
            try:
                if names and time.monotonic() - resolved >= s.dns_refresh_s:
                    resolved = time.monotonic()
                    await self.refresh()
                await self.check_all()
            except Exception:  # a bad DNS answer must not end the checks
                log.exception("replica health check failed")

    def mark_down(self, replica: Replica) -> None:
        """Its GenerateStream call broke: no new request goes there until a check passes."""
        if replica.healthy:
            log.warning("replica %s is unhealthy (its stream broke)", replica.address)
        replica.healthy = False

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    # ----- routing ------------------------------------------------------------------------------

    def pick(self, route: Route) -> Replica:
        """The replica for a request, by the policy, among the healthy ones (all of them when
        none is, or there is one). Raises LookupError when the set is empty."""
        candidates = self.healthy() if len(self.replicas) > 1 else []
        candidates = candidates or list(self.replicas.values())
        if not candidates:
            raise LookupError("no scheduler address resolved")
        return self.policy.choose(candidates, route)

    def routed(self, replica: Replica, route: Route) -> None:
        """A request was started on `replica`: count it (and teach the policy) until done()."""
        replica.load += 1
        replica.requests += 1
        replica.prompt_tokens += len(route.token_ids)
        matched = self.policy.routed(replica, route)
        if matched is not None:
            replica.matched_tokens += matched

    @staticmethod
    def done(replica: Replica) -> None:
        replica.load -= 1

    # ----- what the router serves from them ----------------------------------------------------

    async def wait_for_model_info(self, retry_s: float) -> pb.ModelInfo:
        """GetModelInfo from the first replica that answers, retried until one does."""
        attempt = 0
        while True:
            attempt += 1
            for replica in list(self.replicas.values()):
                try:
                    return await replica.client.model_info(timeout_s=retry_s)
                except grpc.aio.AioRpcError as err:
                    log.info("waiting for the scheduler at %s (attempt %d: %s)",
                             replica.address, attempt, err.code().name)
            await asyncio.sleep(retry_s)
            if not self.fixed:
                await self.refresh()

    async def model_info(self) -> pb.ModelInfo:
        """One try at the first replica. Raises grpc.aio.AioRpcError."""
        return await next(iter(self.replicas.values())).client.model_info()

    async def stats(self) -> tuple[pb.SchedulerStats | None, int]:
        """The replicas' figures now, summed (None when none answers; workers_healthy: any
        replica's are), and how many answered. Updates each replica's health on the way."""
        answers = await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))
        answers = [a for a in answers if a is not None]
        if not answers:
            return None, 0
        total = pb.SchedulerStats(workers_healthy=any(a.workers_healthy for a in answers))
        for name in SUMMED:
            setattr(total, name, sum(getattr(a, name) for a in answers))
        for name in SUMMED_PER_INDEX:
            getattr(total, name).extend(map(sum, zip_longest(*(getattr(a, name) for a in answers),
                                                             fillvalue=0)))
        for name in SETTINGS:
            setattr(total, name, max(getattr(a, name) for a in answers))
        total.lora_requests.extend(lora_requests_summed(answers))
        return total, len(answers)

    async def close(self) -> None:
        self.closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for replica in self.replicas.values():
            await replica.client.close()


def lora_requests_summed(answers: list[pb.SchedulerStats]) -> list[pb.LoraRequests]:
    """Each adapter's running and waiting requests over every replica (SchedulerStats.lora_requests)."""
    by_name: dict[str, pb.LoraRequests] = {}
    for stats in answers:
        for entry in stats.lora_requests:
            total = by_name.setdefault(entry.lora_name, pb.LoraRequests(lora_name=entry.lora_name))
            total.running += entry.running
            total.waiting += entry.waiting
    return list(by_name.values())
