"""Server-sent events as OpenAI streams them: `data: {json}\n\n` frames, then `data: [DONE]\n\n`."""
from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# The frame that ends an OpenAI stream (not a request's end on the scheduler's stream: that is
# router/stream.py REQUEST_FINISHED).
DONE_FRAME = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + compact_json(payload).encode() + b"\n\n"


def compact_json(payload) -> str:
    """JSON as the events carry it: no spaces, non-ASCII characters as themselves."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_string(text: str) -> str:
    """compact_json(text) for a string (or None), without building an encoder (per token)."""
    return "null" if text is None else encode_basestring(text)


class EventStream(StreamingResponse):
    """A streamed response that runs `on_close` however it ends: finished, failed, or cut off by
    the client (Starlette then cancels the body iterator, possibly before its own cleanup runs)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None):
        # no-cache and X-Accel-Buffering: proxies must pass each event on as it comes.
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
