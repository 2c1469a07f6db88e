"""A scheduler without a model, for the router's tests: a grpc.aio `Scheduler` servicer whose
Generate and GenerateStream stream token ids from a script (by default a fixed function of the
prompt), honour max_tokens, stop_token_ids, EOS, ignore_eos, min_tokens and n as the real one
does, and record what they were sent: every GenerateRequest, every abort (the Abort rpc, or an
abort on the stream), every request its client cancelled (a cancelled Generate call, or a request
still generating when the stream aborted it or closed)."""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pb_grpc
from pagedserve.scheduler.service import SERVER_OPTIONS

# (prompt ids, params, sequence index) -> the tokens the "model" writes, before EOS.
Script = Callable[[list[int], pb.SamplingParams, int], list[int]]

FIRST_ORDINARY_ID = 100  # below it: the special tokens of the test tokenizer, and a margin


def default_script(vocab_size: int) -> Script:
    def script(prompt: list[int], params: pb.SamplingParams, index: int) -> list[int]:
        span = vocab_size - FIRST_ORDINARY_ID
        return [FIRST_ORDINARY_ID + (sum(prompt) * 31 + 7 * k + 101 * index) % span
                for k in range(12)]
    return script


@dataclass(eq=False)
class FakeScheduler(pb_grpc.SchedulerServicer):
    vocab_size: int
    eos_token_ids: list[int]
    max_model_len: int = 2048
    model_path: str = ""
    served_model_name: str = ""
    script: Script | None = None
    token_delay_s: float = 0.0          # pause between steps (lets a client leave mid-stream)
    tokens_per_message: int = 1
    fail_with: tuple[grpc.StatusCode, str] | None = None
    healthy: bool = True
    cached_tokens: int = 0
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)  # metadata of each Generate
    _aborted: set[str] = field(default_factory=set)

    def reset(self) -> None:
        self.script, self.token_delay_s, self.tokens_per_message = None, 0.0, 1
        self.fail_with, self.healthy, self.cached_tokens = None, True, 0
        self.requests.clear()
        self.aborts.clear()
        self.cancelled.clear()
        self.authorization.clear()
        self._aborted.clear()

    @property
    def last_params(self) -> pb.SamplingParams:
        return self.requests[-1].params

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return pb.ModelInfo(served_model_name=self.served_model_name, model_path=self.model_path,
                            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                            vocab_size=self.vocab_size, block_size=16, num_kv_blocks=1024,
                            tensor_parallel_size=1)

    async def GetStats(self, request, context) -> pb.SchedulerStats:
        return pb.SchedulerStats(workers_healthy=self.healthy, kv_blocks_total=1024)

    async def Abort(self, request, context) -> pb.AbortResponse:
        self.aborts.append(request.request_id)
        self._aborted.add(request.request_id)
        return pb.AbortResponse(found=True)

    async def Generate(self, request: pb.GenerateRequest, context):
        self.requests.append(request)
        self.authorization.append(dict(context.invocation_metadata()).get("authorization"))
        if self.fail_with is not None:
            await context.abort(*self.fail_with)
        try:
            async for reply in self.replies(request):
                yield reply
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise

    async def GenerateStream(self, request_iterator, context):
        """The real one's contract, one request's news per message (the fake batches nothing)."""
        outgoing: asyncio.Queue = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}
        authorization = dict(context.invocation_metadata()).get("authorization")

        async def read() -> None:
            async for message in request_iterator:
                if message.HasField("generate"):
                    self.requests.append(message.generate)
                    self.authorization.append(authorization)
                    running[message.generate.request_id] = asyncio.create_task(
                        self.run_on_stream(message.generate, outgoing))
                else:
                    self.aborts.append(message.abort.request_id)
                    self._aborted.add(message.abort.request_id)
                    self.cancel(running.pop(message.abort.request_id, None),
                                message.abort.request_id)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await outgoing.get()
        finally:
            reader.cancel()
            for request_id, task in running.items():
                self.cancel(task, request_id)

    def cancel(self, task: asyncio.Task | None, request_id: str) -> None:
        if task is not None and not task.done():
            task.cancel()
            self.cancelled.append(request_id)

    async def run_on_stream(self, request: pb.GenerateRequest, outgoing: asyncio.Queue) -> None:
        if self.fail_with is not None:
            code, details = self.fail_with
            outgoing.put_nowait(pb.GenerateStreamResponse(errors=[pb.RequestError(
                request_id=request.request_id, code=code.value[0], message=details)]))
            return
        async for reply in self.replies(request):
            outgoing.put_nowait(pb.GenerateStreamResponse(responses=[reply]))
        outgoing.put_nowait(pb.GenerateStreamResponse(finished=[request.request_id]))

    async def replies(self, request: pb.GenerateRequest):
        """The request's messages, a step's worth every token_delay_s; none after an Abort. A
        continuation (resume_output_token_ids) starts after the tokens it was given, as the real
        scheduler does."""
        params = request.params
        n = params.n if params.HasField("n") else 1
        outputs = [self.sequence(request, i) for i in range(n)]
        step = self.tokens_per_message
        resumed = len(request.resume_output_token_ids)
        for start in range(resumed, max(len(tokens) for tokens, _ in outputs), step):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            if request.request_id in self._aborted:
                return
            for index, (tokens, reason) in enumerate(outputs):
                if start < len(tokens):
                    yield self.message(request, index, tokens, start, start + step, reason)

    def message(self, request, index, tokens, start, end, reason) -> pb.GenerateResponse:
        chunk = tokens[start:end]
        last = end >= len(tokens)
        out = pb.GenerateResponse(
            request_id=request.request_id, index=index, token_ids=chunk,
            finish_reason=reason if last else pb.FINISH_REASON_UNSPECIFIED,
            prompt_tokens=len(request.prompt_token_ids), completion_tokens=min(end, len(tokens)),
            cached_tokens=self.cached_tokens)
        if request.params.HasField("logprobs"):
            out.logprobs.extend(self.logprob(t, request.params.logprobs) for t in chunk)
        return out

    def logprob(self, token: int, k: int) -> pb.TokenLogprob:
        """The sampled token is always the most likely: top[0] is itself, at -0.25."""
        top = [pb.TopLogprob(token_id=(token + j) % self.vocab_size, logprob=-0.25 - j)
               for j in range(k)]
        return pb.TokenLogprob(token_id=token, logprob=-0.25, top=top)

    def sequence(self, request: pb.GenerateRequest, index: int) -> tuple[list[int], int]:
        """One sequence's tokens and finish reason, cut where the real scheduler would cut it."""
        p = request.params
        prompt = list(request.prompt_token_ids)
        max_tokens = p.max_tokens if p.HasField("max_tokens") else self.max_model_len - len(prompt)
        max_tokens = min(max_tokens, self.max_model_len - len(prompt))
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        out = []
        for token in self.model_stream(prompt, p, index):
            out.append(token)
            if token in stops and len(out) >= p.min_tokens:
                return out, pb.FINISH_REASON_STOP
            if len(out) >= max_tokens:
                return out, pb.FINISH_REASON_LENGTH
        raise AssertionError("unreachable")

    def model_stream(self, prompt, params, index) -> Iterator[int]:
        """The script, then EOS; again and again (what follows EOS matters with ignore_eos)."""
        script = (self.script or default_script(self.vocab_size))(prompt, params, index)
        return itertools.cycle([*script, self.eos_token_ids[0]])


class FakeSchedulerServer:
    """Serves a FakeScheduler on 127.0.0.1 from the given event loop; restartable on its port."""

    def __init__(self, fake: FakeScheduler, port: int = 0):
        self.fake = fake
        self.port = port
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = grpc.aio.server(options=SERVER_OPTIONS)  # the real one's keepalive policy
        pb_grpc.add_SchedulerServicer_to_server(self.fake, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
