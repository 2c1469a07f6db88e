"""The front end of the scheduler: what the router's HTTP API (router/app.py, router/serving.py)
and the offline LLM (pagedserve/entrypoints/llm.py) share to serve a request over gRPC, so that
both read a request and build its output with the same code.

    frontend = await Frontend.connect(settings, metrics)      # the served model, a gRPC client
    req = parse_completion(body, frontend.model)               # router/protocol.py; or parse_chat
    run = await frontend.start(req, request_ids, arrival)      # router/run.py
    try:
        async for index, delta in deltas(run, await run.first()):
            ...                                                # what a message added to a choice
    finally:
        run.close()                                            # aborts what still runs
    run.choices                                                # router/output.py ChoiceOutputs
    await frontend.close()

The parsers raise APIError 400 naming the field; start, first and deltas raise APIError with the
HTTP status a scheduler error maps to (router/errors.py). What the HTTP API adds on top (JSON
shapes, server-sent events, disconnects, HTTP metrics) stays in router/serving.py; the offline API
copies the choices into vLLM's RequestOutput.
"""
from __future__ import annotations

import asyncio
from typing import Sequence

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.generation import start_generation
from pagedserve.router.model import ServedModel, load_served_model
from pagedserve.router.protocol import GenerationRequest
from pagedserve.router.replicas import ReplicaSet
from pagedserve.router.request_metrics import RequestMetrics
from pagedserve.router.run import Run
from pagedserve.router.thinking_first import start_thinking_first
from pagedserve.router.settings import Settings


class Frontend:
    def __init__(self, replicas: ReplicaSet, model: ServedModel, metrics: RequestMetrics):
        self.replicas = replicas
        self.model = model
        self.metrics = metrics

    @classmethod
    async def connect(cls, settings: Settings, metrics: RequestMetrics,
                      wait: bool = True) -> "Frontend":
        """Asks the scheduler at settings.scheduler_addr (or the first of
        settings.scheduler_addrs to answer: router/replicas.py) what it serves and loads that
        model's tokenizer. wait: retry until a scheduler answers (the router may start before
        it); else one try, whose grpc.aio.AioRpcError is raised. Raises SystemExit if no model
        directory is known (settings.model, or the scheduler's model_path)."""
        replicas = ReplicaSet(settings)
        try:
            await replicas.start()
            info = await (replicas.wait_for_model_info(settings.startup_retry_s) if wait
                          else replicas.model_info())
            model = await asyncio.to_thread(load_served_model, settings, info)
        except BaseException:
            await replicas.close()
            raise
        return cls(replicas, model, metrics)

    async def start(self, req: GenerationRequest, request_ids: Sequence[str],
                    arrival: float, session: str | None = None) -> Run:
        """Sends one GenerateRequest per prompt of `req`, named by `request_ids` (one per prompt,
        each unique among the requests in flight), and returns the Run that follows them.
        `arrival`: time.perf_counter() when the request came in. `session`: the session
        header's value (--routing-policy session). Raises APIError 503 if the scheduler is
        unreachable."""
        if len(request_ids) != len(req.prompts):
            raise ValueError(f"{len(request_ids)} request ids for {len(req.prompts)} prompts")
        requests = [pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt.token_ids,
                                       params=req.params)
                    for request_id, prompt in zip(request_ids, req.prompts)]
        if req.lora is not None:
            for r in requests:
                r.lora_request.CopyFrom(req.lora.request())
        plan = req.think_first
        if plan is not None:
            generation = await start_thinking_first(self.replicas, requests[0], plan.start_ids,
                                                    plan.end_ids, plan.thinking, session)
        else:
            generation = await start_generation(self.replicas, requests, session)
        return Run(req, self.model, generation, self.metrics, arrival)

    async def close(self) -> None:
        """Closes the gRPC channels: the schedulers abort whatever still runs on them."""
        await self.replicas.close()
