"""The scheduler requests behind one HTTP request: one per prompt (each with its n sequences),
started on the router's GenerateStream call (router/stream.py), their news merged into one stream
of (prompt index, message).

Whatever ends the HTTP handler early (the client went away, an error, every choice hit a stop
string) closes the Generation: an abort for each request still running goes out on the stream,
so no request is left holding KV blocks.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.client import SchedulerClient
from pagedserve.router.errors import from_grpc
from pagedserve.router.stream import REQUEST_FINISHED, GenerateStream

log = logging.getLogger("pagedserve.router")


class Generation:
    def __init__(self, client: SchedulerClient, requests: list[pb.GenerateRequest]):
        self._client = client
        self._requests = requests
        # (prompt, a GenerateResponse, REQUEST_FINISHED or an AioRpcError), as router/stream.py
        # delivers them
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stream: GenerateStream | None = None
        self._started: set[int] = set()  # prompts whose request was sent
        self._open = set(range(len(requests)))  # prompts whose request has not ended
        self._deferred: tuple[int, object] | None = None  # an error ready() left for next()

    def request_id(self, prompt: int) -> str:
        return self._requests[prompt].request_id

    async def start(self) -> None:
        """Sends every prompt's request. Raises APIError 503 if the scheduler is unreachable."""
        self._stream = await self._client.stream()
        for i, request in enumerate(self._requests):
            self._stream.start(request, lambda item, i=i: self._queue.put_nowait((i, item)))
            self._started.add(i)

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
        if item is REQUEST_FINISHED:
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
        if prompt in self._started:
            self._stream.abort(self.request_id(prompt))  # what it already sent is ignored


async def start_generation(client: SchedulerClient,
                           requests: list[pb.GenerateRequest]) -> Generation:
    generation = Generation(client, requests)
    try:
        await generation.start()
    except BaseException:  # an unreachable scheduler, or the client left while we connected
        generation.close()
        raise
    return generation
