"""The batching policy: which sequences compute how many tokens in the next step.

Continuous batching with chunked prefill, as in vLLM's v1 scheduler: every sequence simply has
tokens it has not computed yet (a whole prompt, the rest of a prompt, or the one token sampled last
step). Each step spends a token budget on running sequences first, decodes before prefill chunks so
that a long prompt never stalls the streams beside it, then admits waiting sequences first come,
first served. When blocks run out, the most recently admitted running sequence is preempted: its
blocks go back and it waits at the front of the queue to be recomputed.

With async scheduling (vLLM's --async-scheduling) the engine asks for plan N+1 while step N runs.
A sequence whose step N samples a token is then scheduled for one more token before that token is
known: the worker appends its own sampled tokens, so the plan needs only the count. Such a sequence
finishing at step N computes one token in step N+1 that update() throws away, and is freed in plan
N+2. A sequence preempted by plan N+1 keeps what step N samples for it, and is re-added only once
that result is in. Sequences that step N certainly finishes (max_tokens, max_model_len) are not
run ahead, nor those with structured outputs, whose grammar must not see a token past its end,
nor those that speculate (scheduler/speculation.py): their drafts follow the token that step samples.
"""
from __future__ import annotations

from collections import deque

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import worker_pb2 as wpb

from .config import SchedulerConfig
from .kv_cache_manager import KVCacheManager
from .lora import lora_fits
from .request import Request, SamplingLimits, Sequence, Status
from .speculation import Speculator


class QueueFull(Exception):
    """The waiting queue is at --max-waiting-requests."""


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching,
                                 config.sliding_window, config.max_num_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        # Per plan sent and not yet answered, oldest first: (sequence, tokens) in plan order.
        self.in_flight: deque[list[tuple[Sequence, int]]] = deque()
        self.freed: list[int] = []  # sequences the workers must forget in the next plan
        self.next_seq_id = 0
        self.next_admission = 0
        self.next_step_id = 0
        self.num_preemptions = 0
        self.num_requests_resumed = 0  # requests held through a lost worker and admitted again
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.speculator = Speculator(config.speculative_config, config.max_model_len)

    # ----- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: list[int], params: pb.SamplingParams,
                    limits: SamplingLimits, resumed: list[int] = (),
                    pooling: pb.PoolingParams | None = None,
                    lora: pb.LoRARequest | None = None) -> Request:
        """Queues a request of n sequences. `resumed`: a continuation's output so far
        (GenerateRequest.resume_output_token_ids, n is 1): the sequence starts with prompt +
        resumed and those tokens count as generated and already sent, as after a preemption.
        `pooling`: an embedding request's resolved PoolingParams (prompt-only). `lora`: the
        adapter the request runs with (None: the base model)."""
        limit = self.config.max_waiting_requests
        if limit and len(self.waiting) >= limit:
            raise QueueFull(f"the waiting queue is full ({limit} requests); retry later")
        request = Request(request_id, list(prompt), params, limits, arrival=len(self.requests),
                          pooling=pooling, lora=lora)
        if params.HasField("num_prompt_logprobs"):
            request.num_prompt_logprobs = params.num_prompt_logprobs
        n = params.n if params.HasField("n") else 1
        for index in range(n):
            seq = Sequence(self.next_seq_id, request, index, [*prompt, *resumed], len(prompt),
                           num_sent=len(resumed))
            self.next_seq_id += 1
            request.sequences.append(seq)
            self.waiting.append(seq)
        self.requests[request_id] = request
        self.prompt_tokens_total += len(prompt)
        return request

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.finished:
                self.finish(seq, pb.FINISH_REASON_ABORT)
        return request

    def finish(self, seq: Sequence, reason: int) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)  # aborted, or preempted while the step that ended it ran
        self.free_blocks(seq)
        seq.num_scheduled = 0
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq.request.finished:
            self.requests.pop(seq.request.request_id, None)

    def free_blocks(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed = 0
        if seq.on_worker:
            self.freed.append(seq.seq_id)
            seq.on_worker = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.freed)

    # ----- one step -----------------------------------------------------------------------------

    def schedule(self) -> wpb.StepPlan:
        """The next step's plan. Its sequences are remembered until update() gets its result; an
        empty plan (nothing scheduled, nothing freed) is not, since it is never sent. With async
        scheduling this may be called again before the previous plan's result came back."""
        plan = wpb.StepPlan(step_id=self.next_step_id)
        self.next_step_id += 1
        scheduled: list[tuple[Sequence, int]] = []
        budget = self.config.max_num_batched_tokens
        budget, preempted = self.schedule_running(plan, scheduled, budget)
        if not preempted:
            self.schedule_waiting(plan, scheduled, budget)
        plan.freed_seq_ids.extend(self.freed)
        self.freed = []
        if scheduled or plan.freed_seq_ids:
            self.in_flight.append(scheduled)
        return plan

    def schedule_running(self, plan: wpb.StepPlan, scheduled: list, budget: int) -> tuple[int, bool]:
        # Decodes first, prefill chunks after, each in admission order: self.running is in that
        # order already (admit() appends, and the admission counter only grows), so no sort.
        decodes, chunks = [], []
        for seq in self.running:
            n = seq.num_tokens - seq.num_computed - seq.num_scheduled
            if n <= 0:  # its step in flight samples a token: one more follows, if it can
                if n < 0 or not self.runs_ahead(seq):
                    continue  # (n < 0: already run ahead; never with one plan ahead at most)
                n = 1
            (decodes if n == 1 else chunks).append((seq, n))
        preempted = False
        add = plan.scheduled.add
        for seq, n in decodes + chunks:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(n, budget)
            # A decode may carry draft tokens (speculative decoding); without blocks for them too,
            # it decodes plainly rather than preempt anyone.
            drafts = self.speculator.drafts(seq, budget) if n == 1 else []
            new_blocks = self.kv.allocate_slots(seq, n + len(drafts)) if drafts else None
            if new_blocks is None:
                drafts = []
                new_blocks = self.kv.allocate_slots(seq, n)
            if new_blocks is None:
                new_blocks = self.make_room(seq, n, scheduled)
                if new_blocks is None:
                    preempted = True
                    continue
            n += len(drafts)
            entry = add(seq_id=seq.seq_id, num_tokens=n)
            if new_blocks:
                entry.new_block_ids.extend(new_blocks)
            if drafts:
                entry.draft_token_ids.extend(drafts)
                seq.num_drafts_in_flight = len(drafts)
            seq.num_scheduled += n
            scheduled.append((seq, n))
            budget -= n
        return budget, preempted

    def runs_ahead(self, seq: Sequence) -> bool:
        """Whether seq, whose step in flight samples a token, is scheduled for the next one before
        that token is known (async scheduling): not when that token certainly ends it."""
        limits = seq.request.limits
        # Nor those that speculate: their drafts come from the tokens that step samples, and how
        # many tokens a step with drafts adds is known only from its result.
        return not (seq.num_drafts_in_flight or self.speculator.speculates(seq)
                    or seq.num_output + 1 >= limits.max_tokens
                    or seq.num_tokens + 1 >= self.config.max_model_len
                    or seq.request.params.HasField("structured_outputs"))

    def make_room(self, seq: Sequence, n: int, scheduled: list) -> list[int] | None:
        """Blocks for seq's next n tokens, preempting the newest running sequences not in this
        plan until they fit; None when seq itself had to be preempted."""
        in_plan = {s.seq_id for s, _ in scheduled}
        while (blocks := self.kv.allocate_slots(seq, n)) is None:
            candidates = [s for s in self.running if s.seq_id not in in_plan]
            victim = max(candidates, key=lambda s: s.admitted)
            self.preempt(victim)
            if victim is seq:
                return None
        return blocks

    def preempt(self, seq: Sequence) -> None:
        """seq waits to be recomputed. Its num_scheduled stays the count of its tokens in steps
        still in flight (async scheduling), until update() applies them."""
        self.running.remove(seq)
        self.free_blocks(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule_waiting(self, plan: wpb.StepPlan, scheduled: list, budget: int) -> None:
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            if self.waits_for_leader(seq) or not lora_fits(seq, self.running, self.config.max_loras):
                i += 1
                continue
            if seq.num_scheduled:
                # Preempted by this plan while its step runs (async scheduling): re-added now, the
                # worker would get its tokens without the one that step samples, sample it again,
                # and update() would append both. It waits for that step's result, and as it
                # heads the queue nobody overtakes it (first come, first served).
                break
            n = self.admit(seq, budget, plan, scheduled)
            if n == 0:
                break  # first come, first served: nobody overtakes a request that does not fit
            del self.waiting[i]
            budget -= n

    def waits_for_leader(self, seq: Sequence) -> bool:
        """With n > 1, the siblings of the first sequence wait until it has computed the prompt,
        then find the prompt's full blocks in the prefix cache instead of computing them again."""
        if seq.index == 0 or not self.kv.enable_caching:
            return False
        leader = seq.request.sequences[0]
        return not leader.finished and leader.num_computed < leader.num_prompt_tokens

    def admit(self, seq: Sequence, budget: int, plan: wpb.StepPlan, scheduled: list) -> int:
        """Starts seq with as many tokens as budget and blocks allow; 0 if it cannot start now."""
        prompt_logprobs = self.prompt_logprobs_of(seq)
        # Cached blocks would skip the rows whose logprobs are still wanted: use only those whose
        # positions are done (none at first; the part computed before a preemption).
        limit = None if prompt_logprobs is None else len(seq.request.prompt_logprobs)
        if pools_every_position(seq.request):
            limit = 0  # MEAN and CLS pooling read every position's hidden state: no cache hit
        computed = self.kv.get_computed_blocks(seq, max_num_tokens=limit)
        num_cached = computed.num_tokens
        n = min(seq.num_tokens - num_cached, budget)
        block_table = self.kv.allocate_slots(seq, n, computed)
        if block_table is None:
            return 0
        if seq.admitted == 0:  # first admission (a continuation's prompt is its own prompt)
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        seq.num_computed = num_cached
        seq.status = Status.RUNNING
        self.next_admission += 1
        seq.admitted = self.next_admission
        self.running.append(seq)
        seq.on_worker = True
        plan.new_sequences.append(wpb.NewSequence(
            seq_id=seq.seq_id, token_ids=seq.token_ids, params=sequence_params(seq),
            num_computed_tokens=num_cached, num_generated=seq.num_output,
            num_prompt_logprobs=prompt_logprobs, pooling=seq.request.pooling, lora_request=seq.request.lora))
        plan.scheduled.add(seq_id=seq.seq_id, num_tokens=n, new_block_ids=block_table)
        seq.num_scheduled = n
        scheduled.append((seq, n))
        return n

    # ----- results ------------------------------------------------------------------------------

    @staticmethod
    def prompt_logprobs_of(seq: Sequence) -> int | None:
        """The k the worker must compute seq's prompt logprobs with, or None. The first of n
        sequences computes them for the request; its siblings share its prompt."""
        request = seq.request
        return request.num_prompt_logprobs if seq.index == 0 and request.needs_prompt_logprobs else None

    def update(self, result: wpb.StepResult) -> list[Sequence]:
        """Applies the oldest plan's result (results come back in the order plans were sent);
        returns the sequences that have news for their client."""
        scheduled = self.in_flight.popleft()
        sampled = dict(zip(result.seq_ids, result.token_ids))
        logprobs = {lp.seq_id: lp.logprob for lp in result.logprobs} if result.logprobs else None
        prompt_chunks = ({chunk.seq_id: chunk for chunk in result.prompt_logprobs}
                         if result.prompt_logprobs else None)
        pooled = {p.seq_id: p.embedding for p in result.pooled} if result.pooled else None
        accepted = {a.seq_id: a for a in result.accepted} if result.accepted else {}
        block_size = self.kv.block_size
        news = []
        for seq, n in scheduled:
            verified = accepted.get(seq.seq_id)
            seq.num_drafts_in_flight = 0
            if verified is not None:
                self.speculator.record(verified.num_draft_tokens, len(verified.token_ids))
            if seq.status is Status.RUNNING:
                before = seq.num_computed
                # The K/V written for rejected drafts is garbage: those slots are computed again.
                rejected = verified.num_draft_tokens - len(verified.token_ids) if verified else 0
                seq.num_computed = before + n - rejected
                seq.num_scheduled -= n
                if seq.num_computed // block_size != before // block_size:
                    self.kv.cache_blocks(seq)  # a block was filled
            elif seq.status is Status.FINISHED:
                continue  # aborted, or ended by the token of the step before (async scheduling)
            else:
                # Preempted by a plan built while this step ran (async scheduling): its blocks
                # went back, but what the step computed and sampled for it holds.
                seq.num_scheduled -= n
            if prompt_chunks is not None and (chunk := prompt_chunks.get(seq.seq_id)) is not None:
                seq.request.add_prompt_logprobs(chunk.first_position, chunk.logprobs)
            if pooled is not None and seq.seq_id in pooled and seq.status is Status.RUNNING:
                seq.embedding = list(pooled[seq.seq_id])  # an embedding request ends with its prompt
                self.finish(seq, pb.FINISH_REASON_STOP)
                news.append(seq)
                continue
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            tokens = [token] if verified is None else [*verified.token_ids, token]
            entries = [None] * len(tokens)
            if logprobs is not None and seq.seq_id in logprobs:
                entries = [*(verified.logprobs if verified else ()), logprobs[seq.seq_id]]
            self.append_tokens(seq, tokens, entries)
            news.append(seq)
        return news

    def append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list) -> None:
        """Appends a step's tokens (one, or accepted drafts and one) until one finishes seq."""
        for token, entry in zip(tokens, logprobs):
            seq.token_ids.append(token)
            self.generation_tokens_total += 1
            if entry is not None:
                seq.pending_logprobs.append(entry)
            reason = self.finish_reason(seq, token)
            if reason:
                self.finish(seq, reason)
                return

    def finish_reason(self, seq: Sequence, token: int) -> int:
        limits = seq.request.limits
        num_tokens = len(seq.token_ids)
        num_output = num_tokens - seq.num_prompt_tokens
        if num_output >= limits.min_tokens:
            if token in limits.eos_token_ids and not limits.ignore_eos:
                return pb.FINISH_REASON_STOP
            if token in limits.stop_token_ids:
                return pb.FINISH_REASON_STOP
        if num_output >= limits.max_tokens or num_tokens >= self.config.max_model_len:
            return pb.FINISH_REASON_LENGTH
        return pb.FINISH_REASON_UNSPECIFIED

    def suspend_all(self) -> list[Request]:
        """The workers lost their state (a worker died): every request in flight is kept, and
        each of its sequences waits to be recomputed from its prompt and generated tokens, exactly
        as after a preemption (the sampler's seeding by position makes the recompute produce the
        same tokens). The steps in flight are lost with their results; the block pool starts
        empty (the restarted worker's cache holds nothing, cached prefixes included).
        Returns the requests held, each counted as having lived through one more loss."""
        for seq in self.running + list(self.waiting):
            seq.num_computed = seq.num_scheduled = 0
            seq.on_worker = False
        for seq in reversed(self.running):  # self.running is in admission order: it goes first
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)
        self.running = []
        self.freed = []
        self.in_flight.clear()
        self.kv.reset()
        held = list(self.requests.values())
        for request in held:
            request.num_losses += 1
        return held

    def fail_all(self) -> list[Request]:
        """The workers lost their state: every request ends, every block comes back."""
        failed = list(self.requests.values())
        for request in failed:
            self.abort(request.request_id)
        self.freed = []
        self.in_flight.clear()
        self.kv.reset()
        return failed


def pools_every_position(request: Request) -> bool:
    """An embedding request whose pooling reads more than the last position's hidden state."""
    return request.pooling is not None and request.pooling.pooling_type != pb.POOLING_TYPE_LAST


def sequence_params(seq: Sequence) -> pb.SamplingParams:
    """The request's sampling parameters as the worker applies them to one of its n sequences.
    A seeded request's siblings get seeds seed+index: each choice is reproducible, yet they differ."""
    params = seq.request.params
    if seq.index == 0 or not params.HasField("seed"):
        return params
    derived = pb.SamplingParams()
    derived.CopyFrom(params)
    derived.seed = (params.seed + seq.index) % 2**64  # the field is uint64
    return derived
