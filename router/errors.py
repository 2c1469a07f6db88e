"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with their status.

Every failure a client can see goes through `APIError`, so SDKs raise their usual exception classes
(BadRequestError, AuthenticationError, NotFoundError, InternalServerError) with a message that says
what was wrong and which parameter to fix.
"""
from __future__ import annotations

import logging
import re

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("pagedserve.router")

# How long a client should wait before retrying a request the scheduler could not take.
RETRY_AFTER_S = 1
# The scheduler's INVALID_ARGUMENT details start with the field at fault: "max_tokens: ...".
FIELD_PREFIX = re.compile(r"^([a-z_]+): ")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist. This server serves `{served}`.",
                    "invalid_request_error", "model", "model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect API key provided. Pass it as `Authorization: Bearer <key>`.",
                    "invalid_request_error", None, "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the server's limit of {limit} bytes "
                    "(--max-request-body-bytes).", "invalid_request_error", None,
                    "request_too_large")


def scheduler_unavailable(detail: str) -> APIError:
    """The scheduler is down, or it could not run the request (no worker serving, a worker lost
    while the request ran): `detail` says which."""
    return APIError(503, f"The scheduler could not serve the request ({detail}); retry shortly.",
                    "service_unavailable_error", None, "scheduler_unavailable",
                    {"Retry-After": str(RETRY_AFTER_S)})


def from_grpc(err: grpc.aio.AioRpcError) -> APIError:
    """The scheduler's status codes as HTTP errors (the contract atop scheduler.proto)."""
    code, detail = err.code(), err.details() or err.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = FIELD_PREFIX.match(detail)
        return invalid(field.group(1) if field else None,
                       f"The scheduler rejected the request: {detail}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return APIError(409, f"{detail}: send a different X-Request-Id.", "invalid_request_error",
                        None, "duplicate_request_id")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        log.error("the scheduler refused the router's key: %s", detail)
        return APIError(500, "The scheduler refused the router's credentials: start both with "
                        "the same --api-key.", "server_error", None, "scheduler_auth_failed")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return APIError(503, f"The server is overloaded ({detail}); retry shortly.",
                        "service_unavailable_error", None, "server_overloaded",
                        {"Retry-After": str(RETRY_AFTER_S)})
    if code == grpc.StatusCode.UNAVAILABLE:
        return scheduler_unavailable(detail)
    log.error("scheduler call failed: %s %s", code.name, detail)
    return APIError(500, f"The scheduler failed: {code.name}: {detail}", "server_error", None,
                    "scheduler_error")


async def handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def handle_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405 (wrong method), in the same shape."""
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                    type_, headers=dict(exc.headers or {})).response()


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}",
                    "server_error").response()
