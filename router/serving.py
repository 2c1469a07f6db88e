"""Serving a completion or a chat request over HTTP: read the body, start its Run through the
front end (router/frontend.py), answer with one JSON response or with server-sent events.

Errors that happen before the first tokens (an unreachable or full scheduler, a rejected request)
are real HTTP errors even when streaming: the response starts only once the first message is in.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.router.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, until_disconnect
from pagedserve.router.errors import APIError, invalid
from pagedserve.router.embedding_request import not_served
from pagedserve.router.frontend import Frontend
from pagedserve.router.output import Delta
from pagedserve.router.protocol import parse_chat, parse_completion
from pagedserve.router.responses import ChatResponses, CompletionResponses, Responses
from pagedserve.router.run import Event, Run, deltas
from pagedserve.router.sse import DONE_FRAME, EventStream, event


async def read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(None, f"The request body is not valid JSON: {exc}") from None


async def serve_completion(request: Request) -> Response:
    return await serve(request, parse_completion, CompletionResponses, "cmpl")


async def serve_chat(request: Request) -> Response:
    return await serve(request, parse_chat, ChatResponses, "chatcmpl")


async def serve(request: Request, parse: Callable, responses_class: type[Responses],
                id_prefix: str) -> Response:
    arrival = time.perf_counter()
    frontend: Frontend = request.app.state.frontend
    model = frontend.model
    if model.runner == "pooling":
        raise not_served(model)
    req = parse(await read_json(request), model)
    request_ids = [grpc_request_id(request, i) for i in range(len(req.prompts))]
    responses = responses_class(f"{id_prefix}-{request.state.request_id}", req.lora.name if req.lora else model.name,
                                int(time.time()), model.tokenizer, req)
    try:
        session = request.headers.get(frontend.replicas.settings.session_header)
        run = await until_disconnect(request, frontend.start(req, request_ids, arrival, session))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    streaming = False
    try:
        first = await until_disconnect(request, run.first())
        if req.stream:
            streaming = True  # from here the response closes the run when it ends
            return EventStream(stream(run, responses, first), run.close)
        return JSONResponse(await until_disconnect(request, collect(run, responses, first)))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except APIError as err:
        # The scheduler names "structured_outputs"; the client wrote response_format or tools.
        if err.param == "structured_outputs" and req.constraint_param:
            err.param = req.constraint_param
            err.message = err.message.replace("structured_outputs: ", f"{req.constraint_param}: ", 1)
        raise
    finally:
        if not streaming:
            run.close()


def grpc_request_id(request: Request, prompt: int) -> str:
    """The id the scheduler sees: the HTTP request's id and the prompt's index. A client-chosen id
    gets a random part too: two requests reusing it must not collide in the scheduler."""
    base = request.state.request_id
    if request.state.request_id_given:
        base = f"{base}-{secrets.token_hex(4)}"
    return f"{base}-{prompt}"


async def collect(run: Run, responses: Responses, first: Event | None) -> dict:
    results = [Delta() for _ in run.choices]
    async for index, delta in deltas(run, first):
        results[index].absorb(delta)
    return responses.final(results, run.usage())


def live_usage(run: Run) -> dict | None:
    """The usage so far, for a chunk of a stream that asked for it on every chunk."""
    return run.usage() if run.req.continuous_usage else None


async def stream(run: Run, responses: Responses, first: Event | None) -> AsyncIterator[bytes]:
    for chunk in responses.opening():
        yield event(chunk)
    try:
        item = first
        while item is not None:
            # Messages already queued (the router fell behind the scheduler) go out in one write:
            # each write costs a send() and a pass through Starlette and uvicorn.
            frames = []
            while item is not None:
                index, delta = run.handle(item)
                if delta:
                    frames.append(responses.chunk_event(index, delta, live_usage(run)))
                item = run.generation.ready()
            if frames:
                yield b"".join(frames)
            item = await run.generation.next()
        for index, delta in run.abandoned():
            yield responses.chunk_event(index, delta, live_usage(run))
        if run.req.include_usage:
            yield event(responses.usage_chunk(run.usage()))
    except APIError as err:  # after the 200 went out, an error can only travel as an event
        yield event(err.body())
    yield DONE_FRAME
