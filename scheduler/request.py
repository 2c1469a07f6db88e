"""Requests and their sequences, as the scheduler sees them: token ids and counters, no tensors."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedserve.v1 import scheduler_pb2 as pb


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingLimits:
    """The parts of the sampling parameters the scheduler acts on (the worker does the rest)."""

    max_tokens: int
    min_tokens: int
    stop_token_ids: frozenset[int]
    eos_token_ids: frozenset[int]
    ignore_eos: bool

    @classmethod
    def of(cls, params: pb.SamplingParams, eos_token_ids: frozenset[int]) -> "SamplingLimits":
        """Read from a request's resolved params (scheduler/validation.py: max_tokens is set)."""
        return cls(params.max_tokens, params.min_tokens, frozenset(params.stop_token_ids),
                   eos_token_ids, params.ignore_eos)


@dataclass(eq=False)
class Sequence:
    """One generated continuation of a request's prompt (a request with n > 1 has n of them)."""

    seq_id: int
    request: "Request"
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    status: Status = Status.WAITING
    num_computed: int = 0          # tokens whose K/V are in the cache (steps whose results came back)
    num_scheduled: int = 0         # tokens of steps sent whose results have not come back yet
    admitted: int = 0              # admission order: the newest running sequence is preempted first
    num_cached_tokens: int = 0     # prompt tokens found in the prefix cache at first admission
    on_worker: bool = False        # the worker holds its state (so it must be told to free it)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    num_sent: int = 0              # output tokens already streamed to the client
    pending_logprobs: list = field(default_factory=list)
    embedding: list[float] | None = None  # an embedding request's pooled vector, once computed
    num_drafts_in_flight: int = 0  # draft tokens of its step in flight (speculative decoding)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: pb.SamplingParams
    limits: SamplingLimits
    arrival: int                    # admission order, FCFS
    sequences: list[Sequence] = field(default_factory=list)
    # SamplingParams.num_prompt_logprobs: None, or k and the entries for prompt positions 1.. so far
    num_prompt_logprobs: int | None = None
    prompt_logprobs: list[pb.PromptLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    num_losses: int = 0             # lost workers it was held through (scheduler.suspend_all)
    # An embedding request's resolved PoolingParams (scheduler/pooling.py): prefill only, no token.
    pooling: pb.PoolingParams | None = None
    # The LoRA adapter it runs (GenerateRequest.lora_request); None: the base model.
    lora: pb.LoRARequest | None = None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions remain whose logprobs are still to be computed."""
        return (self.num_prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1)

    def add_prompt_logprobs(self, first_position: int, entries) -> None:
        """Keeps the entries not known yet: a sequence recomputed after preemption may repeat
        some positions (it restarts at its last full cached block)."""
        skip = len(self.prompt_logprobs) + 1 - first_position
        if skip >= 0:
            self.prompt_logprobs.extend(entries[skip:])

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)
