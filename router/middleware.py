"""The layers every HTTP request passes: its id, the body size limit, and the API key check."""
from __future__ import annotations

import secrets
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.router.errors import body_too_large, unauthorized
from pagedserve.router.logs import current_request_id

REQUEST_ID_HEADER = "x-request-id"
# Operational endpoints stay open: health checks and scrapers rarely carry the key.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class RequestIdMiddleware:
    """Takes the client's X-Request-Id (or makes one), keeps it in `request.state.request_id` and
    echoes it on the response, errors included, so a client can find its request in our logs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["request_id_given"] = request_id, bool(given)
        # Not reset on the way out: uvicorn runs each request in a task of its own, and the error
        # handler of last resort (outside this middleware) should still log the id.
        current_request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Refuses a body over `limit` bytes with 413, by its Content-Length before reading it, or
    while reading it when it comes in chunks: a client cannot make the router buffer gigabytes."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await body_too_large(self.limit).response()(scope, receive, send)
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise body_too_large(self.limit)  # answered by the APIError handler
            return message

        await self.app(scope, receive_counted, send)


class ApiKeyMiddleware:
    """With --api-key, the API's routes need `Authorization: Bearer <key>`; else a 401."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.expected is not None and scope["type"] == "http"
                and scope["path"].startswith(PROTECTED_PREFIXES)):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):  # constant time: no key probing
                return await unauthorized().response()(scope, receive, send)
        await self.app(scope, receive, send)
