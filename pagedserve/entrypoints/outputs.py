"""What the offline API returns, shaped as vLLM's RequestOutput and CompletionOutput: built from
the router's per-choice output (router/output.py ChoiceOutput), the same the HTTP API shapes."""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.router.output import ChoiceOutput


@dataclass
class CompletionOutput:
    index: int                    # which of the prompt's n sequences
    text: str                     # as the HTTP API returns it: stop strings and EOS left out
    token_ids: list[int]          # every generated token, up to the one that ended the sequence
    finish_reason: str | None     # "stop", "length" or "abort"
    # Per token: {token id: logprob} of the sampled token and the alternatives, when asked for.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    # vLLM's: the stop string or stop token id that ended it; None for EOS, length or abort
    stop_reason: str | int | None = None

    @classmethod
    def from_choice(cls, index: int, choice: ChoiceOutput, with_logprobs: bool) -> "CompletionOutput":
        out = cls(index, choice.text, list(choice.token_ids), choice.finish_reason,
                  stop_reason=choice.stop_reason)
        if with_logprobs:
            out.logprobs = [{lp.token_id: lp.logprob, **dict(lp.top)} for lp in choice.logprobs]
            out.cumulative_logprob = choice.cumulative_logprob
        return out

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
