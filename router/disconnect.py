"""Noticing a client that hangs up while its request is still waiting on the scheduler.

Starlette does not cancel a handler when its client disconnects; uvicorn only reports it through
`receive()`, which, once the body has been read, returns `http.disconnect` when the connection
drops. We race the handler's work against that, so a vanished client aborts its generation instead
of letting it run to max_tokens. (Streamed responses get the same from StreamingResponse itself.)
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")

# nginx's "client closed request": never seen by the client, but it keeps logs and metrics honest.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected (with `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # its own cleanup (closing the Generation) runs as it unwinds
    if task not in done:
        raise ClientDisconnected()
    return task.result()
