"""The scheduler requests behind one HTTP request: one per prompt (each with its n sequences),
each started on the GenerateStream call (router/stream.py) of the replica the routing policy
picks for it (router/replicas.py), their news merged into one stream of (prompt index, message).

When a prompt's call breaks (its scheduler went away), the prompt is resumed on a healthy
replica as a continuation of the tokens already received (router/resume.py): its messages go
on coming, and the Run that reads them never knows.

Whatever ends the HTTP handler early (the client went away, an error, every choice hit a stop
string) closes the Generation: an abort for each request still running goes out on the stream,
so no request is left holding KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.client import SchedulerClient
from pagedserve.router.errors import from_grpc, scheduler_unavailable
from pagedserve.router.replicas import Replica, ReplicaSet
from pagedserve.router.resume import continuation, resumable
from pagedserve.router.routing import Route
from pagedserve.router.stream import REQUEST_FINISHED, GenerateStream

log = logging.getLogger("pagedserve.router")

RESUME_POLL_S = 0.1  # how often a broken request looks for a healthy replica


class Generation:
    def __init__(self, replicas: ReplicaSet | SchedulerClient, requests: list[pb.GenerateRequest],
                 session: str | None = None):
        """replicas: where to send (a lone SchedulerClient is a set of one). session: the value
        of the request's session header (--routing-policy session)."""
        if isinstance(replicas, SchedulerClient):
            replicas = ReplicaSet.of(replicas)
        self._replicas = replicas
        self._requests = requests
        self._session = session
        # (prompt, a GenerateResponse, REQUEST_FINISHED or an AioRpcError), as router/stream.py
        # delivers them
        self._queue: asyncio.Queue = asyncio.Queue()
        # Per prompt whose request was sent: the replica and the call it runs on.
        self._placed: dict[int, tuple[Replica, GenerateStream]] = {}
        self._open = set(range(len(requests)))  # prompts whose request has not ended
        self._deferred: tuple[int, object] | None = None  # an error ready() left for next()
        # Resumption (router/resume.py), per prompt: the request running now (a continuation
        # after a resumption), the output tokens received (n = 1), the time by which a broken
        # prompt must be resumed, the task resuming it, the errors to let through.
        self._current = list(requests)
        self._outputs: list[list[int]] = [[] for _ in requests]
        self._deadline: dict[int, float] = {}
        self._resuming: dict[int, asyncio.Task] = {}
        self._final: set[int] = set()
        self._attempts = [0] * len(requests)

    def request_id(self, prompt: int) -> str:
        return self._requests[prompt].request_id

    async def start(self) -> None:
        """Sends every prompt's request. Raises APIError 503 if the scheduler is unreachable."""
        for i, request in enumerate(self._requests):
            await self._send(i, request)

    async def _send(self, prompt: int, request: pb.GenerateRequest) -> None:
        """Starts `request` for `prompt` on the replica the policy picks. Raises APIError 503."""
        route = Route(request.prompt_token_ids, self._session)
        try:
            replica = self._replicas.pick(route)
        except LookupError as err:
            raise scheduler_unavailable(str(err)) from None
        stream = await replica.client.stream()
        self._place(prompt, request, replica, stream, route)

    def _place(self, prompt: int, request: pb.GenerateRequest, replica: Replica,
               stream: GenerateStream, route: Route) -> None:
        """Starts `request` for `prompt` on `stream`, the call of `replica`. Raises RuntimeError
        if that call has already broken."""
        stream.start(request, lambda item: self._queue.put_nowait((prompt, item)))
        self._replicas.routed(replica, route)
        self._placed[prompt] = (replica, stream)
        self._current[prompt] = request

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
            self._end(prompt)
            return None
        if isinstance(item, grpc.aio.AioRpcError):
            if self._resume_later(prompt, item):
                return None
            self._end(prompt)
            raise from_grpc(item)
        self._outputs[prompt].extend(item.token_ids)
        self._deadline.pop(prompt, None)  # going again: a later break gets a timeout of its own
        return prompt, item

    # ----- resumption ---------------------------------------------------------------------------

    def _resume_later(self, prompt: int, error: grpc.aio.AioRpcError) -> bool:
        """Starts resuming `prompt`, whose request ended with `error`, if it can be; whether it
        does."""
        request = self._current[prompt]
        if (prompt in self._final
                or not resumable(request, error, request is not self._requests[prompt])
                or self._replicas.closed or self._replicas.settings.resume_timeout <= 0):
            return False
        timeout = self._replicas.settings.resume_timeout
        placed = self._placed.pop(prompt, None)
        if placed is not None:
            self._replicas.mark_down(placed[0])
            self._replicas.done(placed[0])
        deadline = self._deadline.setdefault(prompt, time.monotonic() + timeout)
        log.warning("request %s: %s (%s); resuming it after %d tokens", request.request_id,
                    error.code().name, error.details(), len(self._outputs[prompt]))
        self._resuming[prompt] = asyncio.get_running_loop().create_task(
            self._resume(prompt, error, deadline))
        return True

    async def _resume(self, prompt: int, error: grpc.aio.AioRpcError, deadline: float) -> None:
        """Re-sends `prompt` as a continuation once a replica is healthy; past the deadline, lets
        `error` through as the prompt's end."""
        while time.monotonic() < deadline:
            if self._replicas.healthy():
                self._attempts[prompt] += 1
                request = continuation(self._requests[prompt], self._outputs[prompt],
                                       self._attempts[prompt])
                try:
                    await self._send(prompt, request)
                except Exception as err:  # noqa: BLE001 (an APIError 503: try again)
                    log.info("request %s: not resumed yet (%s)", request.request_id, err)
                else:
                    self._replicas.resumptions += 1
                    return
            await asyncio.sleep(RESUME_POLL_S)
        log.warning("request %s: no replica took it within --resume-timeout",
                    self._requests[prompt].request_id)
        self._final.add(prompt)
        self._queue.put_nowait((prompt, error))

    def _end(self, prompt: int) -> None:
        """The prompt's request ended on its replica: it no longer counts toward its load."""
        self._open.discard(prompt)
        placed = self._placed.pop(prompt, None)
        if placed is not None:
            self._replicas.done(placed[0])

    def finish(self, prompt: int) -> None:
        """The router needs no more tokens for this prompt (stop strings ended all its choices)."""
        if prompt in self._open:
            self._stop(prompt)

    def close(self) -> None:
        """Stops every call still running. Synchronous: it runs in cleanup after a cancellation."""
        for prompt in sorted(self._open):
            self._stop(prompt)
        self._open.clear()

    def _stop(self, prompt: int) -> None:
        task = self._resuming.pop(prompt, None)
        if task is not None:
            task.cancel()
        placed = self._placed.get(prompt)
        if placed is not None:
            placed[1].abort(self._current[prompt].request_id)  # what it already sent is ignored
        self._end(prompt)


async def start_generation(replicas: ReplicaSet | SchedulerClient,
                           requests: list[pb.GenerateRequest],
                           session: str | None = None) -> Generation:
    generation = Generation(replicas, requests, session)
    try:
        await generation.start()
    except BaseException:  # an unreachable scheduler, or the client left while we connected
        generation.close()
        raise
    return generation
