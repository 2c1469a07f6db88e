"""Where the engine puts a request's news: a Generate call's own queue, or the outbox of the
GenerateStream call that started it, which batches all of one step's news into one message.

The engine sees one interface (`Outbox`): `send` a GenerateResponse, `end` or `fail` a request,
then `flush` once per publish (per engine step). A Generate call gets one gRPC message per
sequence per step; a GenerateStream call one per step, whatever the batch: that saves the
per-message cost of grpc.aio on both sides, most of the host's CPU time per decode step at a
batch of 256 (vLLM's engine core likewise sends one EngineCoreOutputs per step).
"""
from __future__ import annotations

import asyncio
from typing import Callable, Protocol

import grpc

from pagedserve.v1 import scheduler_pb2 as pb

# A RequestQueue's last item: its request has ended. Not the router's SSE "[DONE]", which ends
# an HTTP response.
END_OF_REQUEST = object()


class Outbox(Protocol):
    def send(self, reply: pb.GenerateResponse) -> None: ...
    def end(self, request_id: str) -> None: ...
    def fail(self, request_id: str, error: Exception) -> None: ...
    def flush(self) -> None: ...


class RequestQueue(asyncio.Queue):
    """One Generate call's news, for its handler to stream: GenerateResponse messages, then
    END_OF_REQUEST, or the exception that failed the request (its worker was lost)."""

    def send(self, reply: pb.GenerateResponse) -> None:
        self.put_nowait(reply)

    def end(self, request_id: str) -> None:
        self.put_nowait(END_OF_REQUEST)

    def fail(self, request_id: str, error: Exception) -> None:
        self.put_nowait(error)

    def flush(self) -> None:
        pass  # each message is already queued: Generate sends one per sequence per step


class StreamOutbox:
    """One GenerateStream call's news: what is sent between two flushes goes out as one
    GenerateStreamResponse on `messages`. `on_end(request_id)` is told each request's end
    (finished, failed or refused), once."""

    def __init__(self, on_end: Callable[[str], None]):
        self.messages: asyncio.Queue[pb.GenerateStreamResponse | None] = asyncio.Queue()
        self._pending: pb.GenerateStreamResponse | None = None
        self._on_end = on_end

    def send(self, reply: pb.GenerateResponse) -> None:
        self._message().responses.append(reply)

    def end(self, request_id: str) -> None:
        self._message().finished.append(request_id)
        self._on_end(request_id)

    def fail(self, request_id: str, error: Exception) -> None:
        """The engine lost the request (its worker died): Generate's UNAVAILABLE, for it alone."""
        self.refuse(request_id, grpc.StatusCode.UNAVAILABLE, str(error))

    def refuse(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        self.error(request_id, code, message)
        self._on_end(request_id)

    def error(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        """An error entry alone, for a request this call never took in (so nothing ends)."""
        self._message().errors.add(request_id=request_id, code=code.value[0], message=message)

    def flush(self) -> None:
        if self._pending is not None:
            self.messages.put_nowait(self._pending)
            self._pending = None

    def close(self) -> None:
        """No more messages: the call may end (after those queued)."""
        self.flush()
        self.messages.put_nowait(None)

    def _message(self) -> pb.GenerateStreamResponse:
        if self._pending is None:
            self._pending = pb.GenerateStreamResponse()
        return self._pending
