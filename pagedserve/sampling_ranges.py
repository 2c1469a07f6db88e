"""The one table of SamplingParams' value ranges, imported by the two processes that check them:
the scheduler, which resolves and checks every request (scheduler/validation.py), and the router,
which fails fast with OpenAI's error shape before a request leaves HTTP (router/protocol.py).

RANGES are scheduler.proto's (vLLM's SamplingParams' checks). The OpenAI API is narrower in two
places, written here as a change of RANGES, not as a second table: temperature at most 2 and
logit_bias values in [-100, 100]. Ranges that depend on the request (max_tokens against the
context, min_tokens against max_tokens, token ids against the vocabulary) are checked where the
request is known.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

MAX_N = 128            # sequences per request
MAX_LOGPROBS = 20      # alternatives per position: logprobs, top_logprobs, prompt logprobs
INT32_MAX = 2 ** 31 - 1  # counts travel as int32 in scheduler.proto: larger ones cannot be sent


@dataclass(frozen=True)
class Range:
    """Where a value may lie: minimum and maximum inclusive, above exclusive; None: no bound."""

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.minimum is None or value >= self.minimum)
                and (self.maximum is None or value <= self.maximum)
                and (self.above is None or value > self.above))

    def __str__(self) -> str:
        """"in (0, 1]", "in [1, 128]", ">= 0", "> 0"."""
        if self.maximum is None:
            return f"> {self.above}" if self.above is not None else f">= {self.minimum}"
        low = f"({self.above}" if self.above is not None else f"[{self.minimum}"
        return f"in {low}, {self.maximum}]"


# By SamplingParams field name.
RANGES: dict[str, Range] = {
    "temperature": Range(minimum=0),
    "top_p": Range(above=0, maximum=1),
    "top_k": Range(minimum=-1, maximum=INT32_MAX),  # -1 and 0: off
    "min_p": Range(minimum=0, maximum=1),
    "presence_penalty": Range(minimum=-2, maximum=2),
    "frequency_penalty": Range(minimum=-2, maximum=2),
    "repetition_penalty": Range(above=0),
    "n": Range(minimum=1, maximum=MAX_N),
    "logprobs": Range(minimum=0, maximum=MAX_LOGPROBS),
    "num_prompt_logprobs": Range(minimum=0, maximum=MAX_LOGPROBS),
    "max_tokens": Range(minimum=1, maximum=INT32_MAX),
    "min_tokens": Range(minimum=0, maximum=INT32_MAX),
}

# The HTTP API's: OpenAI's bounds where they are narrower, on top of RANGES.
OPENAI_RANGES: dict[str, Range] = {
    **RANGES,
    "temperature": replace(RANGES["temperature"], maximum=2),
    "logit_bias": Range(minimum=-100, maximum=100),  # each bias value
}
