"""The scheduler calls behind one HTTP request: one Generate stream per prompt (each with its n
sequences), merged into one stream of (prompt index, message).

Whatever ends the HTTP handler early (the client went away, an error, every choice hit a stop
string) closes the Generation: its calls are cancelled, which the scheduler treats as an abort,
and an explicit Abort is sent as well, so no request is left holding KV blocks.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from pagedserve.v1 import scheduler_pb2 as pb
from router.client import SchedulerClient
from router.errors import from_grpc

log = logging.getLogger("router")

_END = object()  # a prompt's stream ended normally


class Generation:
    def __init__(self, client: SchedulerClient, requests: list[pb.GenerateRequest]):
        self._client = client
        self._requests = requests
        self._queue: asyncio.Queue = asyncio.Queue()
        self._calls: dict[int, grpc.aio.UnaryStreamCall] = {}
        self._pumps: dict[int, asyncio.Task] = {}
        self._open = set(range(len(requests)))  # prompts whose stream has not ended
        self._deferred: tuple[int, object] | None = None  # an error ready() left for next()

    def request_id(self, prompt: int) -> str:
        return self._requests[prompt].request_id

    async def start(self) -> None:
        for i, request in enumerate(self._requests):
            self._calls[i] = await self._client.generate(request)
            self._pumps[i] = asyncio.get_running_loop().create_task(self._pump(i))

    async def next(self) -> tuple[int, pb.GenerateResponse] | None:
        """The next message of any prompt; None once every prompt's stream has ended."""
        while self._open:
            if self._deferred is not None:
                entry, self._deferred = self._deferred, None
            else:
                entry = await self._queue.get()
            event = self._take(entry)
            if event is not None:
                return event
        return None

    def ready(self) -> tuple[int, pb.GenerateResponse] | None:
        """The next message if one is already queued, without waiting; else None (which, unlike
        next()'s, does not mean the streams have ended). An error is left for next() to raise:
        the caller first sends out what it took before it."""
        while self._open and self._deferred is None and not self._queue.empty():
            entry = self._queue.get_nowait()
            if isinstance(entry[1], grpc.aio.AioRpcError):
                self._deferred = entry
                return None
            event = self._take(entry)
            if event is not None:
                return event
        return None

    def _take(self, entry: tuple[int, object]) -> tuple[int, pb.GenerateResponse] | None:
        prompt, item = entry
        if prompt not in self._open:
            return None  # queued before the prompt was finished early
        if item is _END:
            self._open.discard(prompt)
            return None
        if isinstance(item, grpc.aio.AioRpcError):
            self._open.discard(prompt)
            raise from_grpc(item)
        return prompt, item

    def finish(self, prompt: int) -> None:
        """The router needs no more tokens for this prompt (stop strings ended all its choices)."""
        if prompt in self._open:
            self._open.discard(prompt)
            self._stop(prompt)

    def close(self) -> None:
        """Stops every call still running. Synchronous: it runs in cleanup after a cancellation."""
        for prompt in sorted(self._open):
            self._stop(prompt)
        self._open.clear()

    def _stop(self, prompt: int) -> None:
        if prompt in self._calls:
            self._calls[prompt].cancel()
            self._pumps[prompt].cancel()
            self._client.abort_soon(self.request_id(prompt))

    async def _pump(self, prompt: int) -> None:
        try:
            async for message in self._calls[prompt]:
                self._queue.put_nowait((prompt, message))
            self._queue.put_nowait((prompt, _END))
        except grpc.aio.AioRpcError as err:
            self._queue.put_nowait((prompt, err))  # ignored by next() if we cancelled it ourselves
        except asyncio.CancelledError:
            pass


async def start_generation(client: SchedulerClient,
                           requests: list[pb.GenerateRequest]) -> Generation:
    generation = Generation(client, requests)
    try:
        await generation.start()
    except BaseException:  # an unreachable scheduler, or the client left while we connected
        generation.close()
        raise
    return generation
