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

DEFAULT_RESUME_TIMEOUT_S = 60.0  # the default of --resume-timeout (pagedserve/flags.py)
# A request held through this many lost workers fails instead: one whose own step kills
# the worker each time must not take every restart down with it forever.
MAX_LOSSES = 3


class Engine:
    def __init__(self, scheduler: Scheduler, workers: WorkerGroup, eos_token_ids: list[int],
                 resume_timeout: float = DEFAULT_RESUME_TIMEOUT_S):
        self.scheduler = scheduler
        self.workers = workers
        self.eos_token_ids = frozenset(eos_token_ids)
        self.resume_timeout = resume_timeout  # seconds the requests held wait for the workers
        self.held: list[Request] = []  # requests kept through the last lost worker, not resumed yet
        self.outboxes: dict[str, Outbox] = {}  # where each request in flight's news goes
        self.wakeup = asyncio.Event()
        self.healthy = False
        self.num_steps = 0

    # ----- requests -----------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: pb.SamplingParams,
            outbox: Outbox | None = None, resumed: list[int] = (),
            pooling: pb.PoolingParams | None = None, lora: pb.LoRARequest | None = None) -> Outbox:
        """Queues a request whose params validation.check resolved; its news goes to `outbox`
        (a new RequestQueue if none is given), which is returned. `resumed`: a continuation's
        output so far (GenerateRequest.resume_output_token_ids). `pooling`: an embedding
        request's resolved PoolingParams (scheduler/pooling.py).
        Raises QueueFull (scheduler.py) when the waiting queue is full."""
        limits = SamplingLimits.of(params, self.eos_token_ids)
        request = self.scheduler.add_request(request_id, prompt, params, limits, resumed, pooling,
                                             lora)
        outbox = RequestQueue() if outbox is None else outbox
        self.outboxes[request_id] = outbox
        self.wakeup.set()
        log.info("request %s queued: %d prompt tokens, max_tokens %d, n %d%s", request_id,
                 len(prompt), limits.max_tokens, len(request.sequences),
                 f", resumed after {len(resumed)} tokens" if resumed else "")
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
        self.tell_failed(self.scheduler.fail_all(), error)
        self.held = []

    def fail(self, requests: list[Request], error: Exception) -> None:
        """These requests end with `error`; their blocks go back."""
        for request in requests:
            self.scheduler.abort(request.request_id)
        self.tell_failed(requests, error)

    def tell_failed(self, requests: list[Request], error: Exception) -> None:
        written: set = set()
        for request in requests:
            outbox = self.outboxes.pop(request.request_id, None)
            if outbox is not None:
                log.warning("request %s failed: %s", request.request_id, error)
                outbox.fail(request.request_id, error)
                written.add(outbox)
        for outbox in written:
            outbox.flush()

    def suspend(self, error: WorkerLost) -> None:
        """A worker was lost with every sequence's KV cache: the requests in flight are held, to
        be recomputed once the workers are back (connect); a request already held through
        MAX_LOSSES lost workers fails now."""
        held = self.scheduler.suspend_all()
        doomed = [r for r in held if r.num_losses >= MAX_LOSSES]
        if doomed:
            self.fail(doomed, WorkerLost(f"{error}; the request was lost with the worker's state "
                                         f"{MAX_LOSSES} times, retry it"))
        self.held = [r for r in held if r.num_losses < MAX_LOSSES]
        if self.held:
            log.warning("%d requests held until the workers are back (at most %g s, "
                        "--resume-timeout)", len(self.held), self.resume_timeout)

    # ----- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.connect()
            try:
                await self.serve_steps()
            except WorkerLost as e:
                log.error("%s; holding the requests in flight and reconnecting", e)
                self.healthy = False
                self.workers.cancel()
                self.suspend(e)

    async def connect(self) -> None:
        """(Re)joins the workers: each new Execute stream starts on an empty worker batch, and
        the block pool is sized to the cache the workers now have (a restarted worker may have
        found a different amount of free memory). The requests held through a lost worker are
        resumed, or fail if the workers are not back within resume_timeout seconds."""
        infos = await self.wait_for_workers()
        self.resize_pool(min(info.num_kv_blocks for info in infos))
        self.workers.open()
        self.healthy = True
        resumed = [r for r in self.held if not r.finished]
        if resumed:
            self.scheduler.num_requests_resumed += len(resumed)
            log.warning("%d requests resumed: recomputing their prompts and generated tokens",
                        len(resumed))
            self.wakeup.set()
        self.held = []
        log.info("workers ready: %s%s", ", ".join(self.workers.addresses),
                 " (async scheduling)" if self.scheduler.config.async_scheduling else "")

    async def wait_for_workers(self):
        """Every rank's WorkerInfo, once they answer. While requests are held, at most
        resume_timeout seconds pass before they fail (as they did before resuming existed); the
        wait for the workers goes on after that."""
        if self.held:
            try:
                return await asyncio.wait_for(self.workers.wait_ready(), self.resume_timeout)
            except asyncio.TimeoutError:
                self.fail_all(WorkerLost(
                    f"no worker came back within {self.resume_timeout:g} s (--resume-timeout); "
                    "the request was lost with the worker's state, retry it"))
        return await self.workers.wait_ready()

    def resize_pool(self, num_blocks: int) -> None:
        """Sized while no sequence holds a block: at start-up, and after a lost worker (requests
        held then hold none)."""
        kv = self.scheduler.kv
        if num_blocks != kv.num_blocks and not kv.tables:
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
            workers_healthy=self.healthy, num_requests_resumed=s.num_requests_resumed,
            spec_decode_num_drafts=s.speculator.num_drafts,
            spec_decode_num_draft_tokens=s.speculator.num_draft_tokens,
            spec_decode_num_accepted_tokens=s.speculator.num_accepted_tokens,
            spec_decode_num_accepted_tokens_per_pos=s.speculator.num_accepted_per_pos,
            lora_requests=lora_requests(s.running, s.waiting),
            max_loras=s.config.max_loras if s.config.enable_lora else 0)
