"""Serving a completion or a chat request: open the scheduler calls, turn their token ids into
choices, answer with one JSON response or with server-sent events.

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

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.detokenizer import IncrementalDetokenizer
from pagedserve.router.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, until_disconnect
from pagedserve.router.errors import APIError, invalid
from pagedserve.router.generation import Generation, start_generation
from pagedserve.router.metrics import Metrics
from pagedserve.router.model import ServedModel
from pagedserve.router.output import ChoiceOutput, Delta
from pagedserve.router.protocol import GenerationRequest, parse_chat, parse_completion
from pagedserve.router.responses import ChatResponses, CompletionResponses, Responses, usage
from pagedserve.router.sse import DONE_FRAME, EventStream, event
from pagedserve.router.stop import StopStrings
from pagedserve.router.tool_calls import ToolCallOutput

Event = tuple[int, pb.GenerateResponse]


async def read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(None, f"The request body is not valid JSON: {exc}") from None


class Run:
    """One request's generation in flight: its choices, its scheduler calls, its usage."""

    def __init__(self, req: GenerationRequest, model: ServedModel, generation: Generation,
                 metrics: Metrics, arrival: float):
        self.req = req
        self.generation = generation
        self.metrics = metrics
        self.arrival = arrival  # time.perf_counter() when the HTTP request came in
        self.choices = [self.new_choice(model, prompt.token_ids)
                        for prompt in req.prompts for _ in range(req.n)]
        self.last_output = [None] * len(self.choices)  # when each choice last got tokens
        self.cached_tokens = [0] * len(req.prompts)
        self.wants_prompt_logprobs = req.params.HasField("num_prompt_logprobs")
        # With tools, each choice's text goes through its tool-call parser (router/tool_calls.py).
        self.tool_calls = [ToolCallOutput(req.tools) for _ in self.choices] if req.tools else None
        self.closed = False
        metrics.in_flight.inc()

    def new_choice(self, model: ServedModel, prompt_ids: list[int]) -> ChoiceOutput:
        decode = model.tokenizer.decoder(self.req.skip_special_tokens)
        stop = StopStrings(self.req.stop, self.req.include_stop_str)
        return ChoiceOutput(IncrementalDetokenizer(decode, prompt_ids), stop,
                            self.req.hidden_stop_ids, self.req.params.min_tokens,
                            frozenset(self.req.params.stop_token_ids))

    def handle(self, event: Event) -> tuple[int, Delta]:
        prompt, message = event
        index = prompt * self.req.n + message.index
        if self.wants_prompt_logprobs and self.req.prompts[prompt].logprobs is None:
            self.req.prompts[prompt].logprobs = list(message.prompt_logprobs)  # the first message's
        if not self.req.generate:
            message = prompt_only(message)
        self.time_output(index)
        choice = self.choices[index]
        delta = choice.add(message)
        if self.tool_calls:
            delta = self.tool_calls[index].process(delta)
        self.cached_tokens[prompt] = max(self.cached_tokens[prompt], message.cached_tokens)
        if choice.finish_reason is not None:
            self.finish_if_stopped(prompt)
        return index, delta

    def finish_if_stopped(self, prompt: int) -> None:
        """Stop strings are the router's: once they have ended every choice of a prompt, the
        scheduler would only be generating tokens nobody reads."""
        mine = self.choices[prompt * self.req.n:(prompt + 1) * self.req.n]
        if all(c.finished for c in mine) and any(c.stopped_here for c in mine):
            self.generation.finish(prompt)

    def time_output(self, index: int) -> None:
        """Inter-token latency, as vLLM counts it: once per output after a sequence's first."""
        now = time.perf_counter()
        if self.last_output[index] is not None and not self.choices[index].finished:
            self.metrics.inter_token_latency.observe(now - self.last_output[index])
        self.last_output[index] = now

    def abandoned(self) -> list[tuple[int, Delta]]:
        out = [(i, c.abandon()) for i, c in enumerate(self.choices) if not c.finished]
        if self.tool_calls:
            out = [(i, self.tool_calls[i].process(delta)) for i, delta in out]
        return out

    def usage(self) -> dict:
        return usage(self.prompt_tokens(), self.completion_tokens(), sum(self.cached_tokens))

    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.req.prompts)

    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def close(self) -> None:
        """However the request ended: stop what still runs on the scheduler, count it once."""
        if self.closed:
            return
        self.closed = True
        self.generation.close()
        self.metrics.in_flight.dec()
        self.metrics.e2e_latency.observe(time.perf_counter() - self.arrival)
        for choice in self.choices:
            self.metrics.finished(choice.finish_reason or "abort")


def prompt_only(message: pb.GenerateResponse) -> pb.GenerateResponse:
    """max_tokens 0: the token the scheduler had to generate is not shown, and the choice ends
    as vLLM's does, on "length"."""
    reason = message.finish_reason
    if reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
        reason = pb.FINISH_REASON_LENGTH
    return pb.GenerateResponse(index=message.index, prompt_tokens=message.prompt_tokens,
                               cached_tokens=message.cached_tokens, finish_reason=reason)


async def serve_completion(request: Request) -> Response:
    return await serve(request, parse_completion, CompletionResponses, "cmpl")


async def serve_chat(request: Request) -> Response:
    return await serve(request, parse_chat, ChatResponses, "chatcmpl")


async def serve(request: Request, parse: Callable, responses_class: type[Responses],
                id_prefix: str) -> Response:
    arrival = time.perf_counter()
    state = request.app.state
    model: ServedModel = state.model
    req = parse(await read_json(request), model)
    grpc_requests = [pb.GenerateRequest(request_id=grpc_request_id(request, i),
                                        prompt_token_ids=p.token_ids, params=req.params)
                     for i, p in enumerate(req.prompts)]
    responses = responses_class(f"{id_prefix}-{request.state.request_id}", model.name,
                                int(time.time()), model.tokenizer, req)
    try:
        generation = await until_disconnect(request, start_generation(state.client, grpc_requests))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    run = Run(req, model, generation, state.metrics, arrival)
    streaming = False
    try:
        first = await until_disconnect(request, generation.next())
        state.metrics.time_to_first_token.observe(time.perf_counter() - arrival)
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


async def deltas(run: Run, first: Event | None) -> AsyncIterator[tuple[int, Delta]]:
    """Every (choice index, delta) of the run, until the scheduler's streams end; the run's
    choices (ChoiceOutput) then hold the whole outputs."""
    item = first
    while item is not None:
        yield run.handle(item)
        item = await run.generation.next()
    for pair in run.abandoned():
        yield pair


async def collect(run: Run, responses: Responses, first: Event | None) -> dict:
    results = [Delta() for _ in run.choices]
    async for index, delta in deltas(run, first):
        results[index].absorb(delta)
    return responses.final(results, run.usage())


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
                    frames.append(responses.chunk_event(index, delta))
                item = run.generation.ready()
            if frames:
                yield b"".join(frames)
            item = await run.generation.next()
        for index, delta in run.abandoned():
            yield responses.chunk_event(index, delta)
        if run.req.include_usage:
            yield event(responses.usage_chunk(run.usage()))
    except APIError as err:  # after the 200 went out, an error can only travel as an event
        yield event(err.body())
    yield DONE_FRAME
