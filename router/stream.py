"""The router's one GenerateStream call to the scheduler: every request of the router process is
started and aborted on it, and one reader task hands each server message's news to the request it
is for (scheduler.proto says why one call: one gRPC message per engine step instead of one per
sequence per step).

A request's news is delivered to the callback it was started with: each GenerateResponse, then
REQUEST_FINISHED, or a grpc.aio.AioRpcError carrying the status the Generate rpc would have ended
with (so pagedserve.router.errors.from_grpc maps it to the same HTTP error). When the call itself
fails or ends, every request on it gets that call's error; the client then opens a new call for
the next request.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import AsyncIterator, Callable

import grpc

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger("pagedserve.router")

REQUEST_FINISHED = object()  # a request finished normally: no more news for it
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

Deliver = Callable[[object], None]  # a GenerateResponse, REQUEST_FINISHED or an AioRpcError


def status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a failed Generate call raises, for one request of the stream."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class CallBroken(grpc.aio.AioRpcError):
    """A request's end because the whole call ended, not a refusal of that request: what the
    router may resume elsewhere (router/resume.py)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class GenerateStream:
    def __init__(self, stub: pb_grpc.SchedulerStub, metadata):
        self._outgoing: asyncio.Queue[pb.GenerateStreamRequest | None] = asyncio.Queue()
        self._routes: dict[str, Deliver] = {}  # requests in flight on this call
        # The call and its reader serve every request: started in an empty context, their tasks
        # do not carry the X-Request-Id of the request that happened to open them (router/logs.py).
        context = contextvars.Context()
        self._call = context.run(stub.GenerateStream, self._client_messages(), metadata=metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read(), context=context)
        self.broken = False  # the call ended: the client opens another

    def start(self, request: pb.GenerateRequest, deliver: Deliver) -> None:
        """Sends `request` (its request_id set, unique) without waiting; its news goes to
        `deliver`. Raises RuntimeError if the call has ended (the caller opens a new one)."""
        if self.broken:
            raise RuntimeError("the GenerateStream call has ended")
        self._routes[request.request_id] = deliver
        self._outgoing.put_nowait(pb.GenerateStreamRequest(generate=request))

    def abort(self, request_id: str) -> None:
        """Stops a request, without waiting (it may run in cleanup after a cancellation): the
        scheduler frees its KV blocks; nothing more is delivered for it. Sent even when its end
        has come in but was not read yet: the scheduler ignores an id that has ended."""
        self._routes.pop(request_id, None)
        if not self.broken:
            abort = pb.AbortRequest(request_id=request_id)
            self._outgoing.put_nowait(pb.GenerateStreamRequest(abort=abort))

    def close(self) -> None:
        """Cancels the call: the scheduler aborts every request still on it."""
        self.broken = True
        self._call.cancel()

    async def _client_messages(self) -> AsyncIterator[pb.GenerateStreamRequest]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        try:
            async for message in self._call:
                self._dispatch(message)
            error = CallBroken(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the stream")
        except grpc.aio.AioRpcError as err:
            error = CallBroken(err.code(), err.details() or err.code().name)
        except asyncio.CancelledError:
            error = CallBroken(grpc.StatusCode.CANCELLED, "the router closed the stream")
        self._fail_all(error)

    def _dispatch(self, message: pb.GenerateStreamResponse) -> None:
        routes = self._routes
        for reply in message.responses:
            deliver = routes.get(reply.request_id)
            if deliver is not None:  # else aborted by the router: its last messages are dropped
                deliver(reply)
        for error in message.errors:
            deliver = routes.pop(error.request_id, None)
            if deliver is not None:
                code = STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN)
                deliver(status_error(code, error.message))
        for request_id in message.finished:
            deliver = routes.pop(request_id, None)
            if deliver is not None:
                deliver(REQUEST_FINISHED)

    def _fail_all(self, error: CallBroken) -> None:
        self.broken = True
        if self._routes:
            log.warning("the GenerateStream call failed (%s: %s): failing its %d requests",
                        error.code().name, error.details(), len(self._routes))
        routes, self._routes = self._routes, {}
        for deliver in routes.values():
            deliver(error)
