"""What the offline API returns, shaped as vLLM's RequestOutput and CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int                    # which of the prompt's n sequences
    text: str                     # as the HTTP API returns it: stop strings and EOS left out
    token_ids: list[int]          # every generated token, up to the one that ended the sequence
    finish_reason: str | None     # "stop", "length" or "abort"
    # Per token: {token id: logprob} of the sampled token and the alternatives, when asked for.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None            # the text given, or the chat as its template rendered it
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0    # prompt tokens found in the prefix cache
    finished: bool = True
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per token
    # {token id: logprob} of the prompt's token and the alternatives (vLLM's, as plain floats).
    prompt_logprobs: list[dict[int, float] | None] | None = None
