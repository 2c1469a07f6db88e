"""The scheduler's Execute streams (scheduler/workers.py) against a real gRPC worker service that
takes a plan and never answers. A step cut short because a worker failed its health check
(WorkerGroup.cancel) must end in WorkerLost, which the step loop recovers from by failing the
requests in flight; grpc.aio raises CancelledError from such a call, and that error, let through,
ended the step loop and left every request in flight (and a shutdown waiting on them) hanging."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.v1 import worker_pb2_grpc as wgrpc
from pagedserve.scheduler.workers import WorkerGroup, WorkerLost


class SilentWorker(wgrpc.WorkerServicer):
    def __init__(self):
        self.plans = asyncio.Queue()

    async def Execute(self, request_iterator, context):
        async for plan in request_iterator:
            await self.plans.put(plan.step_id)  # and no result, ever


@contextlib.asynccontextmanager
async def step_in_flight():
    """(a WorkerGroup, the wait for its step 1's result as a task, as the step loop waits) once
    the silent worker has received that step."""
    worker, server = SilentWorker(), grpc.aio.server()
    wgrpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    group = WorkerGroup([f"127.0.0.1:{port}"])
    try:
        group.open()
        await group.send(wpb.StepPlan(step_id=1))
        step = asyncio.ensure_future(group.receive())
        assert await asyncio.wait_for(worker.plans.get(), 60) == 1
        yield group, step
    finally:
        await group.close()
        await server.stop(None)


def test_a_step_whose_stream_is_cancelled_ends_in_worker_lost():
    async def scenario():
        async with step_in_flight() as (group, step):
            group.cancel()  # what a failed health check does
            with pytest.raises(WorkerLost, match="cancelled"):
                await asyncio.wait_for(step, 60)
    asyncio.run(scenario())


def test_a_step_whose_own_task_is_cancelled_stays_cancelled():
    """The scheduler's shutdown cancels the step loop's task: that must not read as a lost worker."""
    async def scenario():
        async with step_in_flight() as (_, step):
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step
    asyncio.run(scenario())
