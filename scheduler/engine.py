"""The step loop: plan, execute on the workers, apply the results, stream news to the clients.

Everything runs on one asyncio loop, so the scheduler's state needs no locks: Generate,
GenerateStream and Abort handlers change it between steps. Without async scheduling a step's
results are applied before the next plan is made; with it (--async-scheduling) the next plan is
built and sent while the step before it runs, one plan ahead, and results are applied in the
order the plans were sent. Each request's news goes to its outbox (outboxes.py), flushed once a
step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from pagedserve.v1 import scheduler_pb2 as pb

from .outboxes import Outbox, RequestQueue
from .lora import lora_requests
from .request import Request, SamplingLimits, Sequence
from .scheduler import Scheduler
from .workers import WorkerGroup, WorkerLost

log = logging.getLogger("pagedserve.scheduler.engine")



class Engine:
    def __init__(self, scheduler: Scheduler, workers: WorkerGroup, eos_token_ids: list[int]):
        self.scheduler = scheduler
        self.workers = workers
        self.eos_token_ids = frozenset(eos_token_ids)
        self.outboxes: dict[str, Outbox] = {}  # where each request in flight's news goes
        self.wakeup = asyncio.Event()
        self.healthy = False
        self.num_steps = 0

    # ----- requests -----------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: pb.SamplingParams,
            outbox: Outbox | None = None, pooling: pb.PoolingParams | None = None,
            lora: pb.LoRARequest | None = None) -> Outbox:
        """Queues a request whose params validation.check resolved; its news goes to `outbox`
        (a new RequestQueue if none is given), which is returned. `pooling`: an embedding
        request's resolved PoolingParams (scheduler/pooling.py).
        Raises QueueFull (scheduler.py) when the waiting queue is full."""
        limits = SamplingLimits.of(params, self.eos_token_ids)
        request = self.scheduler.add_request(request_id, prompt, params, limits, pooling, lora)
        outbox = RequestQueue() if outbox is None else outbox
        self.outboxes[request_id] = outbox
        self.wakeup.set()
        log.info("request %s queued: %d prompt tokens, max_tokens %d, n %d", request_id,
                 len(prompt), limits.max_tokens, len(request.sequences))
        return outbox

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.abort(request_id)
        if request is None:
            self.outboxes.pop(request_id, None)
            return False
        self.publish(request.sequences)
        self.wakeup.set()  # the workers must be told to forget its sequences
        return True

    def publish(self, news: list[Sequence]) -> None:
        """Sends each sequence's tokens that its client has not seen yet, then flushes each
        outbox written to once: a GenerateStream's news of this step leaves as one message."""
        ended: dict[str, Request] = {}
        written: set = set()
        for seq in news:
            request = seq.request
            outbox = self.outboxes.get(request.request_id)
            if outbox is None:
                continue
            finished = seq.finished
            if finished or seq.num_output > seq.num_sent:
                outbox.send(self.response(seq))
                written.add(outbox)
            if finished and request.finished:  # only a sequence's end can end its request
                ended[request.request_id] = request
        # Only after every sibling's news: n sequences may finish in the same step.
        for request_id, request in ended.items():
            outbox = self.outboxes.pop(request_id)
            outbox.end(request_id)
            written.add(outbox)
            log.info("request %s finished: %s", request_id, ", ".join(
                f"{pb.FinishReason.Name(s.finish_reason)} after {s.num_output} tokens"
                for s in request.sequences))
        for outbox in written:
            outbox.flush()

    @staticmethod
    def response(seq: Sequence) -> pb.GenerateResponse:
        # Only the tokens not sent yet: no copy of the whole output each step.
        tokens = seq.token_ids[seq.num_prompt_tokens + seq.num_sent:]
        seq.num_sent = num_output = seq.num_output
        reply = pb.GenerateResponse(
            request_id=seq.request.request_id, index=seq.index, token_ids=tokens,
            finish_reason=seq.finish_reason, prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=num_output, cached_tokens=seq.num_cached_tokens)
        if seq.embedding is not None:
            reply.embedding.extend(seq.embedding)
        if seq.pending_logprobs:
            reply.logprobs.extend(seq.pending_logprobs)
            seq.pending_logprobs = []
        request = seq.request
        if request.num_prompt_logprobs is not None and not request.prompt_logprobs_sent \
                and not request.needs_prompt_logprobs:
            reply.prompt_logprobs.extend(request.prompt_logprobs)  # once, on the first message
            request.prompt_logprobs_sent = True
        return reply

    def fail_all(self, error: Exception) -> None:
        """The workers lost every sequence's KV cache: each request in flight fails at once with
        an error that says so (its client may retry), and the block pool starts empty."""
        written: set = set()
        for request in self.scheduler.fail_all():
            outbox = self.outboxes.pop(request.request_id, None)
            if outbox is not None:
                log.warning("request %s failed: %s", request.request_id, error)
                outbox.fail(request.request_id, error)
                written.add(outbox)
        for outbox in written:
            outbox.flush()

    # ----- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.connect()
            try:
                await self.serve_steps()
            except WorkerLost as e:
                log.error("%s; failing every request in flight and reconnecting", e)
                self.healthy = False
                self.workers.cancel()
                self.fail_all(WorkerLost(f"{e}; the request was lost with the worker's state, "
                                         "retry it"))

    async def connect(self) -> None:
        """(Re)joins the workers: each new Execute stream starts on an empty worker batch, and
        the block pool is sized to the cache the workers now have (a restarted worker may have
        found a different amount of free memory)."""
        infos = await self.workers.wait_ready()
        self.resize_pool(min(info.num_kv_blocks for info in infos))
        self.workers.open()
        self.healthy = True
        log.info("workers ready: %s%s", ", ".join(self.workers.addresses),
                 " (async scheduling)" if self.scheduler.config.async_scheduling else "")

    def resize_pool(self, num_blocks: int) -> None:
        kv = self.scheduler.kv
        if num_blocks != kv.num_blocks and not self.scheduler.requests:
            log.warning("the workers now hold %d KV blocks (was %d)", num_blocks, kv.num_blocks)
            kv.reset(num_blocks)

    def lose_workers(self) -> None:
        """A health check failed: end the streams, so the step loop fails what is in flight."""
        self.healthy = False
        self.workers.cancel()
        self.wakeup.set()

    async def serve_steps(self) -> None:
        scheduler = self.scheduler
        ahead = 2 if scheduler.config.async_scheduling else 1  # plans sent and not yet answered
        sent: deque[tuple[int, float]] = deque()  # their step ids and send times, oldest first
        while True:
            if not self.healthy:
                raise WorkerLost("a worker stopped answering health checks")
            if len(sent) < ahead and scheduler.has_work():
                plan = scheduler.schedule()
                if plan.scheduled or plan.freed_seq_ids:
                    await self.workers.send(plan)
                    sent.append((plan.step_id, time.perf_counter()))
                    self.log_plan(plan)
                    continue  # with async scheduling, build the next one while this one runs
            if not sent:
                # No work, or nothing fits right now (cannot happen while anything runs).
                await self.idle()
                continue
            step_id, started = sent.popleft()
            result = await self.workers.receive()
            if result.error:
                raise WorkerLost(f"step {step_id} failed on the worker: {result.error}")
            if result.step_id != step_id:
                raise WorkerLost(f"the worker answered step {result.step_id} for step {step_id}")
            self.num_steps += 1
            self.publish(scheduler.update(result))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step %d done in %.1f ms (worker forward %.1f ms)", step_id,
                          (time.perf_counter() - started) * 1e3, result.forward_seconds * 1e3)

    @staticmethod
    def log_plan(plan) -> None:
        if log.isEnabledFor(logging.DEBUG):  # a sum over the batch: only when it is logged
            log.debug("step %d sent: %d seqs, %d tokens", plan.step_id, len(plan.scheduled),
                      sum(s.num_tokens for s in plan.scheduled))

    async def idle(self) -> None:
        self.wakeup.clear()
        await self.wakeup.wait()

    def stats(self) -> pb.SchedulerStats:
        s = self.scheduler
        running = {seq.request.request_id for seq in s.running}
        waiting = {seq.request.request_id for seq in s.waiting} - running
        return pb.SchedulerStats(
            num_requests_running=len(running), num_requests_waiting=len(waiting),
            num_preemptions=s.num_preemptions, kv_blocks_total=s.kv.num_blocks,
            kv_blocks_used=s.kv.num_used_blocks, prefix_cache_queries=s.kv.queries,
            prefix_cache_hits=s.kv.hits, prompt_tokens_total=s.prompt_tokens_total,
            generation_tokens_total=s.generation_tokens_total, num_steps=self.num_steps,
            workers_healthy=self.healthy, lora_requests=lora_requests(s.running, s.waiting),
            max_loras=s.config.max_loras if s.config.enable_lora else 0)
