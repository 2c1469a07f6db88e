"""`LLM`: offline inference from Python, as vLLM's.

    from pagedserve import LLM, SamplingParams
    with LLM(model="models/SmolLM2-135M-Instruct", max_num_seqs=64) as llm:
        outputs = llm.generate(["The capital of France is"], SamplingParams(temperature=0))
        print(outputs[0].outputs[0].text, outputs[0].outputs[0].token_ids)

It starts the worker and scheduler processes with `pagedserve serve`'s launcher, headless (keyword
arguments are serve's flags; no router process: the front end runs here), and stops them on
close(), at the end of a `with` block or at exit. Requests go to the scheduler over gRPC through
the front end the router's HTTP API uses too (router/frontend.py: body parsing, the chat template,
detokenization, stop strings), so each text is the one the HTTP API answers for the same request.
The outputs are built from the front end's per-choice output (router/output.py ChoiceOutput: token
ids as the scheduler sent them, text, logprobs, finish and stop reasons), not from any JSON; its
request metrics go nowhere (NoMetrics): nobody scrapes an offline run.

The gRPC client lives on an event loop in a thread of its own: generate() and chat() are plain
blocking calls, usable from scripts and notebooks alike (which already run a loop).
"""
from __future__ import annotations

import asyncio
import atexit
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from pagedserve.router.errors import APIError
from pagedserve.router.frontend import Frontend
from pagedserve.router.protocol import GenerationRequest, parse_chat, parse_completion
from pagedserve.router.request_metrics import NoMetrics
from pagedserve.router.run import Run, deltas
from pagedserve.router.settings import Settings

from .local_server import LocalServer, serve_args
from pagedserve.entrypoints.outputs import CompletionOutput, RequestOutput
from .progress import Progress
from pagedserve.entrypoints.sampling_params import SamplingParams

Prompt = str | dict  # "text", {"prompt": "text"} or {"prompt_token_ids": [ids]}
Messages = list[dict]


class LLM:
    def __init__(self, model: str, **serve_flags: Any):
        args = serve_args(model, **serve_flags)
        # The scheduler batches up to max_num_seqs; as many again wait in its queue, ready for
        # the next step. More in flight would only hold open streams.
        self._in_flight = args.max_num_seqs + (args.max_waiting_requests or args.max_num_seqs)
        self._in_flight *= args.data_parallel_size  # as many for each replica
        self._frontend: Frontend | None = None
        self._closed = False
        self._server = LocalServer(args, headless=True).start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pagedserve-LLM",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)
        try:
            # The launcher waited for the scheduler: one GetModelInfo, no retries.
            settings = frontend_settings(args, self._server.grpc_address)
            if len(self._server.grpc_addresses) > 1:  # --data-parallel-size: every replica's
                settings.scheduler_addrs = ",".join(self._server.grpc_addresses)
            self._frontend = self._call(Frontend.connect(settings, NoMetrics(), wait=False))
        except BaseException:
            self.close()
            raise

    # ----- the API ------------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order of the prompts."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = params_for(sampling_params, len(prompts))
        requests = [self._parse(parse_completion, {**p.body_fields(chat=False), **prompt_field(x)})
                    for x, p in zip(prompts, params)]
        return self._run(requests, use_tqdm)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of them, each through the chat
        template; one RequestOutput per conversation, in order."""
        chats = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = params_for(sampling_params, len(chats))
        extra = {} if add_generation_prompt else {"add_generation_prompt": False}
        requests = [self._parse(parse_chat, {**p.body_fields(chat=True), **extra, "messages": m})
                    for m, p in zip(chats, params)]
        return self._run(requests, use_tqdm)

    def get_tokenizer(self):
        return self._frontend.model.tokenizer.hf

    def close(self) -> None:
        """Stops the services. Idempotent; also runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self._frontend is not None:
                asyncio.run_coroutine_threadsafe(self._frontend.close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._server.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- running requests ---------------------------------------------------------------------

    def _parse(self, parse: Callable, body: dict) -> GenerationRequest:
        """The front end's checks (the HTTP API's), with their messages; a bad parameter fails
        the call up front."""
        try:
            return parse(body, self._frontend.model)
        except APIError as err:
            raise ValueError(err.message) from None

    def _run(self, requests: list[GenerationRequest], use_tqdm: bool) -> list[RequestOutput]:
        if self._closed:
            raise RuntimeError("This LLM is closed; make a new one.")
        return self._call(self._generate_all(requests, use_tqdm))

    def _call(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C while waiting: stop the work, which aborts it on the scheduler
            future.cancel()
            raise

    async def _generate_all(self, requests: list[GenerationRequest],
                            use_tqdm: bool) -> list[RequestOutput]:
        batch = uuid.uuid4().hex[:12]
        limit = asyncio.Semaphore(self._in_flight)
        with Progress(len(requests), "Processed prompts", use_tqdm) as progress:
            async def one(i: int, request: GenerationRequest) -> RequestOutput:
                async with limit:
                    output = await self._generate(f"offline-{batch}-{i}", request)
                progress.done(sum(len(o.token_ids) for o in output.outputs))
                return output

            tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:  # one failed or we were cancelled: the others stop too
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _generate(self, request_id: str, req: GenerationRequest) -> RequestOutput:
        """One request as the router serves a non-streamed one, through the same front end."""
        request_ids = [f"{request_id}-{i}" for i in range(len(req.prompts))]
        try:
            run = await self._frontend.start(req, request_ids, time.perf_counter())
            try:
                async for _ in deltas(run, await run.first()):
                    pass  # the run's choices gather the whole outputs
            finally:
                run.close()
        except APIError as err:
            raise (ValueError if err.status == 400 else RuntimeError)(err.message) from None
        return request_output(request_id, run)


def frontend_settings(args, scheduler_addr: str) -> Settings:
    """The front end's settings from serve's flags: the model and how it is presented, as the
    router would take them."""
    return Settings(scheduler_addr=scheduler_addr, model=args.model,
                    served_model_name=args.served_model_name, api_key=args.api_key,
                    chat_template=args.chat_template, max_model_len=args.max_model_len)


def request_output(request_id: str, run: Run) -> RequestOutput:
    """The finished run as vLLM's RequestOutput (one prompt: generate() sends them one by one)."""
    req, prompt = run.req, run.req.prompts[0]
    outputs = [CompletionOutput.from_choice(j, choice, with_logprobs=req.logprobs is not None)
               for j, choice in enumerate(run.choices)]
    output = RequestOutput(request_id, prompt.text, prompt.token_ids, outputs, run.cached_tokens[0])
    k = req.prompt_logprobs
    if k is not None and prompt.logprobs is not None:
        output.prompt_logprobs = [None] + [{e.token_id: e.logprob, **{t.token_id: t.logprob for t in e.top[:k]}}
                                           for e in prompt.logprobs]
    return output


def prompt_field(prompt: Prompt) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return {"prompt": list(prompt["prompt_token_ids"])}
    if isinstance(prompt, dict) and "prompt" in prompt:
        return {"prompt": prompt["prompt"]}
    raise TypeError(f"A prompt is a string, {{'prompt': str}} or {{'prompt_token_ids': [ids]}}; "
                    f"got {type(prompt).__name__}.")


def params_for(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"{len(params)} SamplingParams for {count} prompts: give one, or one "
                         "per prompt.")
    return params
