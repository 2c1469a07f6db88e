"""Serving OpenAI's Responses API over HTTP: `POST /v1/responses` (one JSON response, or typed
server-sent events), `GET` and `DELETE /v1/responses/{id}` on the router's store
(router/response_store.py).

The request becomes a chat request (router/responses_api.py) run through the same front end as
/v1/chat/completions; the reply's items and events come from router/responses_output.py. As for
chat, an error before the first tokens is a real HTTP error even when streaming; after it, an
`error` event.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.router.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, until_disconnect
from pagedserve.router.errors import APIError, invalid
from pagedserve.router.frontend import Frontend
from pagedserve.router.response_store import ResponseStore, StoredResponse
from pagedserve.router.responses_api import ResponsesRequest, parse_responses
from pagedserve.router.responses_output import ReplyBuilder, response_usage
from pagedserve.router.run import Event, Run, deltas
from pagedserve.router.serving import grpc_request_id, read_json
from pagedserve.router.sse import EventStream, compact_json


def frame(payload: dict) -> bytes:
    """A typed event as OpenAI sends them: its type on the `event:` line, then the JSON."""
    return f"event: {payload['type']}\ndata: {compact_json(payload)}\n\n".encode()


def not_found(response_id: str) -> APIError:
    return APIError(404, f"No response with id '{response_id}' is stored here (responses live in "
                    "the memory of the router that answered them).", "invalid_request_error",
                    None, "response_not_found")


async def create_response(request: Request) -> Response:
    arrival = time.perf_counter()
    frontend: Frontend = request.app.state.frontend
    store: ResponseStore = request.app.state.response_store
    body = await read_json(request)
    req = parse_responses(body, frontend.model, history(body, store))
    builder = ReplyBuilder(req, frontend.model.name, frontend.model.tokenizer)
    try:
        run = await until_disconnect(request, frontend.start(req.chat, [grpc_request_id(request, 0)],
                                                             arrival))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    def keep() -> None:
        if req.store:
            store.put(StoredResponse(builder.response(builder.status),
                                     req.messages + builder.reply_messages()))

    streaming = False
    try:
        first = await until_disconnect(request, run.first())
        if req.chat.stream:
            streaming = True  # from here the response closes the run when it ends
            return EventStream(stream(run, builder, first, keep), run.close)
        return JSONResponse(await until_disconnect(request, collect(run, builder, first, keep)))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except APIError as err:
        raise constraint_error(err, req)
    finally:
        if not streaming:
            run.close()


def history(body, store: ResponseStore) -> list[dict]:
    """The stored conversation `previous_response_id` names ([] without one)."""
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is None:
        return []
    if not isinstance(previous, str):
        raise invalid("previous_response_id", "'previous_response_id' must be a string.")
    stored = store.get(previous)
    if stored is None:
        err = not_found(previous)
        err.param, err.message = "previous_response_id", f"Previous response with id " \
            f"'{previous}' not found (responses live in the memory of the router that answered " \
            "them, until it restarts or evicts them)."
        raise err
    return list(stored.messages)


def constraint_error(err: APIError, req: ResponsesRequest) -> APIError:
    """The scheduler names "structured_outputs"; the client wrote text.format or tools."""
    if err.param == "structured_outputs" and req.chat.constraint_param:
        param = {"response_format": "text.format"}.get(req.chat.constraint_param,
                                                       req.chat.constraint_param)
        err.param = param
        err.message = err.message.replace("structured_outputs: ", f"{param}: ", 1)
    return err


def usage(run: Run, builder: ReplyBuilder) -> dict:
    return response_usage(run.prompt_tokens(), run.completion_tokens(), sum(run.cached_tokens),
                          builder.reasoning_tokens())


async def collect(run: Run, builder: ReplyBuilder, first: Event | None,
                  keep: Callable[[], None]) -> dict:
    async for _, delta in deltas(run, first):
        builder.add(delta)
    builder.finish(usage(run, builder))
    keep()
    return builder.response(builder.status)


async def stream(run: Run, builder: ReplyBuilder, first: Event | None,
                 keep: Callable[[], None]) -> AsyncIterator[bytes]:
    yield b"".join(frame(e) for e in builder.opening())
    try:
        item = first
        while item is not None:
            frames = []  # messages already queued go out in one write, as chat's do
            while item is not None:
                _, delta = run.handle(item)
                frames += [frame(e) for e in builder.add(delta)]
                item = run.generation.ready()
            if frames:
                yield b"".join(frames)
            item = await run.generation.next()
        events = [e for _, delta in run.abandoned() for e in builder.add(delta)]
        events += builder.finish(usage(run, builder))
        keep()
        yield b"".join(frame(e) for e in events)
    except APIError as err:  # after the 200 went out, an error can only travel as an event
        yield frame(builder.event("error", code=err.code, message=err.message, param=err.param))


async def get_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    stored = request.app.state.response_store.get(response_id)
    if stored is None:
        raise not_found(response_id)
    return JSONResponse(stored.response)


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    if not request.app.state.response_store.delete(response_id):
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
