"""A worker without a model, for the scheduler's tests: it executes step plans by the contract of
worker.proto and checks, at every step, that the KV slots a sequence reads hold exactly its own
tokens. "Sampling" is a fixed function of all tokens so far, so a sequence's output does not depend
on what else runs beside it, unless the scheduler breaks the KV cache."""
from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import worker_pb2 as wpb
from pagedserve.v1 import worker_pb2_grpc as wgrpc


def next_token(tokens: list[int], vocab_size: int) -> int:
    digest = hashlib.blake2b(repr(tokens).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


def prompt_logprob(tokens: list[int], position: int) -> float:
    """The fake model's logprob of tokens[position] given the tokens before it."""
    return -next_token(tokens[:position + 1], 1000) / 100


@dataclass
class FakeSequence:
    tokens: list[int]
    computed: int
    table: list[int] = field(default_factory=list)
    num_prompt: int = 0
    num_prompt_logprobs: int | None = None


class KVCorruption(AssertionError):
    pass


class FakeWorker:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.slots: dict[int, tuple] = {}  # slot -> the prefix whose last token's K/V it holds
        self.seqs: dict[int, FakeSequence] = {}
        # (plan, result) of plans run whose results the scheduler has not applied yet: with async
        # scheduling a plan is sent before the result of the one before it is applied.
        self.sent: deque[tuple[wpb.StepPlan, wpb.StepResult]] = deque()

    def slot(self, seq: FakeSequence, pos: int) -> int:
        block = seq.table[pos // self.block_size]
        assert 0 <= block < self.num_blocks, f"block {block} outside the pool"
        return block * self.block_size + pos % self.block_size

    def execute(self, plan: wpb.StepPlan) -> wpb.StepResult:
        for seq_id in plan.freed_seq_ids:
            assert seq_id in self.seqs, f"freed unknown sequence {seq_id}"
            del self.seqs[seq_id]
        for new in plan.new_sequences:
            assert new.seq_id not in self.seqs, f"sequence {new.seq_id} added twice"
            self.seqs[new.seq_id] = FakeSequence(
                list(new.token_ids), new.num_computed_tokens, num_prompt=len(new.token_ids) - new.num_generated,
                num_prompt_logprobs=new.num_prompt_logprobs if new.HasField("num_prompt_logprobs") else None)
        result = wpb.StepResult(step_id=plan.step_id)
        for item in plan.scheduled:
            seq = self.seqs[item.seq_id]
            seq.table.extend(item.new_block_ids)
            length, drafts = len(seq.tokens), list(item.draft_token_ids)
            if drafts:  # speculative decoding: the drafts are computed like tokens, then verified
                assert seq.computed + 1 == length, "drafts on a sequence that is not decoding"
                seq.tokens += drafts
            assert item.num_tokens >= 1 and seq.computed + item.num_tokens <= len(seq.tokens)
            self.check_cached(item.seq_id, seq)
            for pos in range(seq.computed, seq.computed + item.num_tokens):
                self.slots[self.slot(seq, pos)] = tuple(seq.tokens[:pos + 1])
            self.add_prompt_logprobs(result, item, seq)
            seq.computed += item.num_tokens
            if drafts:
                self.verify(result, item.seq_id, seq, length, drafts)
            if seq.computed == len(seq.tokens):
                token = next_token(seq.tokens, self.vocab_size)
                seq.tokens.append(token)
                result.seq_ids.append(item.seq_id)
                result.token_ids.append(token)
        return result

    def verify(self, result: wpb.StepResult, seq_id: int, seq: FakeSequence, length: int, drafts: list[int]):
        """Greedy verification against the fake model: the drafts that equal its own next tokens."""
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == next_token(seq.tokens[:length + accepted], self.vocab_size):
            accepted += 1
        del seq.tokens[length + accepted:]
        seq.computed = len(seq.tokens)  # the next token is appended below
        result.accepted.append(wpb.AcceptedDrafts(seq_id=seq_id, token_ids=drafts[:accepted],
                                                  num_draft_tokens=len(drafts)))

    @staticmethod
    def add_prompt_logprobs(result: wpb.StepResult, item, seq: FakeSequence) -> None:
        """Entries for the prompt positions whose predecessor this step computes."""
        positions = range(seq.computed + 1, min(seq.computed + item.num_tokens, seq.num_prompt - 1) + 1)
        if seq.num_prompt_logprobs is None or not positions:
            return
        result.prompt_logprobs.append(wpb.PromptLogprobsChunk(
            seq_id=item.seq_id, first_position=positions[0],
            logprobs=[pb.PromptLogprob(token_id=seq.tokens[p], logprob=prompt_logprob(seq.tokens, p), rank=1)
                      for p in positions]))

    def check_cached(self, seq_id: int, seq: FakeSequence) -> None:
        for pos in range(seq.computed):
            held = self.slots.get(self.slot(seq, pos))
            if held != tuple(seq.tokens[:pos + 1]):
                raise KVCorruption(f"sequence {seq_id}: slot of position {pos} holds another prefix")


class RecordingWorker(wgrpc.WorkerServicer):
    """One worker rank over real gRPC, without a model: it reports `info`, executes each Execute
    stream's plans on a FakeWorker of its own (a stream starts on an empty batch) and records every
    plan it was sent."""

    def __init__(self, info: wpb.WorkerInfo):
        self.info = info
        self.plans: list[wpb.StepPlan] = []

    def GetWorkerInfo(self, request, context):
        return self.info

    def Execute(self, request_iterator, context):
        fake = FakeWorker(self.info.num_kv_blocks, self.info.block_size, self.info.vocab_size)
        for plan in request_iterator:
            self.plans.append(plan)
            yield fake.execute(plan)

    def new_sequences(self) -> list[wpb.NewSequence]:
        return [new for plan in self.plans for new in plan.new_sequences]
