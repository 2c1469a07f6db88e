"""The scheduler's side of the Execute streams: one per worker rank, the same plan to every rank.

A plan is serialized once and the same bytes are written to every rank. Plans may be sent ahead of
results (async scheduling): each stream answers in order, so receive() returns the oldest step's."""
from __future__ import annotations

import asyncio
import logging

import grpc

from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.v1 import worker_pb2_grpc as wgrpc

log = logging.getLogger("pagedserve.scheduler.workers")

# A restarted worker must be found within a second of listening again: gRPC's default reconnect
# backoff grows to two minutes while the worker loads its weights.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# The first constraint a worker sees loads the tokenizer's vocabulary (seconds); later ones are cached.
CHECK_TIMEOUT_S = 60.0


EXECUTE = "/pagedserve.v1.Worker/Execute"


class WorkerLost(Exception):
    """A worker rank stopped answering: the state of every sequence in flight is gone."""


def cancelled_by_us() -> bool:
    """Whether the CancelledError being handled came from a call that WorkerGroup.cancel
    cancelled (grpc.aio raises it from such a call's reads and writes), not from a cancellation
    of the task itself (shutdown), which must go on."""
    return not asyncio.current_task().cancelling()


class WorkerGroup:
    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self.channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self.stubs = [wgrpc.WorkerStub(c) for c in self.channels]
        # Execute taking the plan's bytes: serialized once for every rank, not once per rank.
        self.executes = [c.stream_stream(EXECUTE, request_serializer=None,
                                         response_deserializer=wpb.StepResult.FromString)
                         for c in self.channels]
        self.calls: list = []

    async def wait_ready(self, timeout: float | None = None) -> list[wpb.WorkerInfo]:
        """Waits until every rank answers GetWorkerInfo (workers take a while to load weights)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        infos = []
        for address, stub in zip(self.addresses, self.stubs):
            while True:
                try:
                    infos.append(await stub.GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=5))
                    break
                except grpc.aio.AioRpcError as e:
                    if deadline is not None and loop.time() > deadline:
                        raise WorkerLost(f"worker {address} is not answering: {e.details()}") from e
                    log.info("waiting for worker %s (%s)", address, e.code().name)
                    await asyncio.sleep(0.5)
        return infos

    def open(self) -> None:
        """New Execute streams; a worker starts each stream with an empty batch."""
        self.calls = [execute() for execute in self.executes]

    async def send(self, plan: wpb.StepPlan) -> None:
        """Writes the plan to every rank's stream. Raises WorkerLost when a stream has ended."""
        calls = self.calls  # cancel() may empty self.calls while this step waits
        data = plan.SerializeToString()
        try:
            for call in calls:
                await call.write(data)
        except grpc.aio.AioRpcError as e:
            raise WorkerLost(f"a worker failed: {e.code().name}: {e.details()}") from e
        except asyncio.InvalidStateError as e:  # writing to a stream that already ended
            raise WorkerLost("a worker's Execute stream has ended") from e
        except asyncio.CancelledError:
            if not cancelled_by_us():
                raise
            raise WorkerLost("a worker's Execute stream was cancelled (a failed health check)") from None

    async def receive(self) -> wpb.StepResult:
        """The oldest step sent's result: rank 0's carries the sampled tokens (every rank samples
        the same ones), a failed rank's its error. Tensor parallel ranks wait for each other inside
        a step, so the first rank lost ends the step at once: the others would never answer.
        Raises WorkerLost."""
        calls = self.calls
        if not calls:
            raise WorkerLost("the Execute streams were cancelled (a failed health check)")
        if len(calls) == 1:  # no task per read for a single rank
            return await self.read(self.addresses[0], calls[0])
        reads = [asyncio.ensure_future(self.read(a, c)) for a, c in zip(self.addresses, calls)]
        done, pending = await asyncio.wait(reads, return_when=asyncio.FIRST_EXCEPTION)
        for read in pending:
            read.cancel()
        for read in done:
            if read.exception() is not None:
                raise read.exception()
        results = [read.result() for read in reads]
        return next((r for r in results if r.error), results[0])

    @staticmethod
    async def read(address: str, call) -> wpb.StepResult:
        try:
            result = await call.read()
        except grpc.aio.AioRpcError as e:
            raise WorkerLost(f"worker {address} failed: {e.code().name}: {e.details()}") from e
        except asyncio.CancelledError:
            if not cancelled_by_us():
                raise
            raise WorkerLost(f"worker {address}: its Execute stream was cancelled (a failed health "
                             "check)") from None
        if result is grpc.aio.EOF:
            raise WorkerLost(f"worker {address} closed its Execute stream")
        return result

    async def check_structured_output(self, params) -> str:
        """Rank 0 compiles a StructuredOutputParams against the served tokenizer (and keeps it
        cached for the steps): '' when it compiles, else why not. Raises WorkerLost when rank 0
        cannot be asked."""
        try:
            reply = await self.stubs[0].CheckStructuredOutput(params, timeout=CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise WorkerLost(f"worker {self.addresses[0]} failed: {e.code().name}: {e.details()}") from e
        return reply.error

    async def healthy(self, timeout: float = 2.0) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            for channel in self.channels:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
            return True
        except grpc.aio.AioRpcError:
            return False

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        self.calls = []

    async def close(self) -> None:
        self.cancel()
        for channel in self.channels:
            await channel.close()
