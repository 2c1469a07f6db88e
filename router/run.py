"""One request's generation in flight, as every front end of the scheduler follows it (the router's
HTTP API, the offline LLM; router/frontend.py starts it): the scheduler's messages in, each
choice's ChoiceOutput (router/output.py) and per message a Delta out.

A Run reports its latencies and its end to the RequestMetrics it was given
(router/request_metrics.py) and must be closed however the request ends: close() aborts what still
runs on the scheduler.
"""
from __future__ import annotations

import time
from typing import AsyncIterator

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.detokenizer import IncrementalDetokenizer
from pagedserve.router.generation import Generation
from pagedserve.router.model import ServedModel
from pagedserve.router.output import ChoiceOutput, Delta
from pagedserve.router.protocol import GenerationRequest
from pagedserve.router.reasoning_parsers import reasoning_output
from pagedserve.router.request_metrics import RequestMetrics
from pagedserve.router.responses import usage
from pagedserve.router.stop import StopStrings
from pagedserve.router.tool_calls import ToolCallOutput

Event = tuple[int, pb.GenerateResponse]  # (prompt index, one of its scheduler messages)


class Run:
    """One request's generation in flight: its choices, its scheduler calls, its usage."""

    def __init__(self, req: GenerationRequest, model: ServedModel, generation: Generation,
                 metrics: RequestMetrics, arrival: float):
        self.req = req
        self.generation = generation
        self.metrics = metrics
        self.arrival = arrival  # time.perf_counter() when the request came in
        self.choices = [self.new_choice(model, prompt.token_ids)
                        for prompt in req.prompts for _ in range(req.n)]
        self.last_output = [None] * len(self.choices)  # when each choice last got tokens
        self.cached_tokens = [0] * len(req.prompts)
        self.wants_prompt_logprobs = req.params.HasField("num_prompt_logprobs")
        # With tools, each choice's text goes through its tool-call parser (router/tool_calls.py).
        self.tool_calls = [ToolCallOutput(req.tools) for _ in self.choices] if req.tools else None
        # With a reasoning parser the thinking is split off first: tool calls are in the answer.
        self.reasoning = ([reasoning_output(req.reasoning_parser, prompt.text,
                                            req.params.HasField("structured_outputs")
                                            and req.think_first is None)
                           for prompt in req.prompts for _ in range(req.n)]
                          if req.reasoning_parser else None)
        self.closed = False
        metrics.request_started()

    def new_choice(self, model: ServedModel, prompt_ids: list[int]) -> ChoiceOutput:
        decode = model.tokenizer.decoder(self.req.skip_special_tokens)
        stop = StopStrings(self.req.stop, self.req.include_stop_str)
        return ChoiceOutput(IncrementalDetokenizer(decode, prompt_ids), stop,
                            self.req.hidden_stop_ids, self.req.params.min_tokens,
                            frozenset(self.req.params.stop_token_ids))

    async def first(self) -> Event | None:
        """The first message of any prompt (None if every stream ended without one), its time
        to first token reported. Raises APIError as Generation.next does."""
        event = await self.generation.next()
        self.metrics.first_token(time.perf_counter() - self.arrival)
        return event

    def handle(self, event: Event) -> tuple[int, Delta]:
        prompt, message = event
        index = prompt * self.req.n + message.index
        if self.wants_prompt_logprobs and self.req.prompts[prompt].logprobs is None:
            self.req.prompts[prompt].logprobs = list(message.prompt_logprobs)  # the first message's
        if not self.req.generate:
            message = prompt_only(message)
        self.time_output(index)
        choice = self.choices[index]
        delta = self.answer(index, choice.add(message))
        self.cached_tokens[prompt] = max(self.cached_tokens[prompt], message.cached_tokens)
        if choice.finish_reason is not None:
            self.finish_if_stopped(prompt)
        return index, delta

    def finish_if_stopped(self, prompt: int) -> None:
        """Stop strings are the front end's: once they have ended every choice of a prompt, the
        scheduler would only be generating tokens nobody reads."""
        mine = self.choices[prompt * self.req.n:(prompt + 1) * self.req.n]
        if all(c.finished for c in mine) and any(c.stopped_here for c in mine):
            self.generation.finish(prompt)

    def time_output(self, index: int) -> None:
        """Inter-token latency, as vLLM counts it: once per output after a sequence's first."""
        now = time.perf_counter()
        if self.last_output[index] is not None and not self.choices[index].finished:
            self.metrics.inter_token(now - self.last_output[index])
        self.last_output[index] = now

    def abandoned(self) -> list[tuple[int, Delta]]:
        return [(i, self.answer(i, c.abandon())) for i, c in enumerate(self.choices)
                if not c.finished]

    def answer(self, index: int, delta: Delta) -> Delta:
        """A choice's delta with the thinking split off, then the tool calls parsed out."""
        if self.reasoning:
            delta = self.reasoning[index].process(delta)
            if not self.req.include_reasoning:
                delta.reasoning = ""
        if self.tool_calls:
            delta = self.tool_calls[index].process(delta)
        return delta

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
        self.metrics.request_finished(time.perf_counter() - self.arrival,
                                      [choice.finish_reason or "abort" for choice in self.choices])


def prompt_only(message: pb.GenerateResponse) -> pb.GenerateResponse:
    """max_tokens 0: the token the scheduler had to generate is not shown, and the choice ends
    as vLLM's does, on "length"."""
    reason = message.finish_reason
    if reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
        reason = pb.FINISH_REASON_LENGTH
    return pb.GenerateResponse(index=message.index, prompt_tokens=message.prompt_tokens,
                               cached_tokens=message.cached_tokens, finish_reason=reason)


async def deltas(run: Run, first: Event | None) -> AsyncIterator[tuple[int, Delta]]:
    """Every (choice index, delta) of the run from `first` (run.first()'s) on, until the
    scheduler's streams end; the run's choices (ChoiceOutput) then hold the whole outputs."""
    item = first
    while item is not None:
        yield run.handle(item)
        item = await run.generation.next()
    for pair in run.abandoned():
        yield pair
