"""One GenerateStream call on the server: the requests its client starts and aborts on it, their
news batched per engine step into one message (outboxes.StreamOutbox), and what the call's end
means for them: a half-close lets them finish, a cancelled or broken call aborts them all."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from pagedserve.v1 import scheduler_pb2 as pb

from .admission import InFlight, Refused, accept
from .engine import Engine
from .outboxes import StreamOutbox

log = logging.getLogger("pagedserve.scheduler.streams")


class StreamSession:
    """The server's side of one GenerateStream call (scheduler.proto): `replies` is what the
    handler yields. Every request taken in counts in `in_flight` until its end (finished, failed,
    refused or aborted), so a graceful shutdown waits for it."""

    def __init__(self, engine: Engine, info: pb.ModelInfo, in_flight: InFlight):
        self.engine = engine
        self.info = info
        self.in_flight = in_flight
        self.outbox = StreamOutbox(self._ended)
        self.requests: set[str] = set()  # started on this call, not ended
        self.checking: dict[str, asyncio.Task] = {}  # of those, the ones still being checked
        self.reading = True  # the client may still send

    async def replies(self, client_messages: AsyncIterator[pb.GenerateStreamRequest]
                      ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """The call's server messages, while a task takes its client messages; ends once the
        client has half-closed and every request has ended. However it ends (the call cancelled,
        the client gone), the requests still in flight are aborted."""
        reader = asyncio.create_task(self.read(client_messages))
        try:
            while (message := await self.outbox.messages.get()) is not None:
                yield message
        finally:
            reader.cancel()
            self.abort_all()

    async def read(self, client_messages: AsyncIterator[pb.GenerateStreamRequest]) -> None:
        async for message in client_messages:
            if message.HasField("generate"):
                self.start(message.generate)
            elif message.HasField("abort"):
                self.abort(message.abort.request_id)
        self.reading = False  # half-closed: the call ends when its requests have
        self.close_if_done()

    def start(self, request: pb.GenerateRequest) -> None:
        """Takes a request in (checked in a task: a structured-output check awaits a worker, and
        must not hold up the requests behind it). A refusal is that request's RequestError."""
        request_id = request.request_id
        if not request_id or request_id in self.requests:
            self.refuse_untaken(request_id)
            return
        self.requests.add(request_id)
        self.in_flight.enter()
        if not self.in_flight.accepting:
            self.refuse(request_id, Refused(grpc.StatusCode.UNAVAILABLE,
                                            "the scheduler is shutting down; retry shortly"))
            return
        self.checking[request_id] = asyncio.create_task(self.accept(request))

    async def accept(self, request: pb.GenerateRequest) -> None:
        try:
            await accept(self.engine, self.info, request, self.outbox)
        except Refused as e:
            self.refuse(request.request_id, e)
        finally:
            self.checking.pop(request.request_id, None)

    def refuse_untaken(self, request_id: str) -> None:
        """A request without a request_id, or with one already running on this call: its error
        alone, and nothing of this call ends (its twin runs on)."""
        if request_id:
            self.outbox.error(request_id, grpc.StatusCode.ALREADY_EXISTS,
                              f"request_id: {request_id!r} is already in flight")
        else:
            self.outbox.error(request_id, grpc.StatusCode.INVALID_ARGUMENT,
                              "request_id: required on GenerateStream (the client tells its "
                              "requests apart by it)")
        self.outbox.flush()

    def refuse(self, request_id: str, refused: Refused) -> None:
        self.outbox.refuse(request_id, refused.code, refused.message)
        self.outbox.flush()

    def abort(self, request_id: str) -> None:
        """Stops a request of this call; one of another call, or one that ended, is ignored."""
        if request_id not in self.requests:
            return
        task = self.checking.pop(request_id, None)
        if task is not None:  # not queued yet: it ends here (a task not yet started never runs)
            task.cancel()
            self.outbox.end(request_id)
            self.outbox.flush()
        elif not self.engine.abort(request_id):  # else its end comes through publish
            self._ended(request_id)

    def abort_all(self) -> None:
        if self.requests:
            log.info("GenerateStream closed: aborting its %d requests in flight", len(self.requests))
        for request_id in list(self.requests):
            self.abort(request_id)

    def _ended(self, request_id: str) -> None:
        if request_id in self.requests:
            self.requests.discard(request_id)
            self.in_flight.leave()
            self.close_if_done()

    def close_if_done(self) -> None:
        if not self.reading and not self.requests:
            self.outbox.close()
