"""SamplingParams of the offline API, with vLLM's names and defaults.

They become the fields of an OpenAI request body, which the router's own parser checks and turns
into the scheduler's message: the offline API and the HTTP API cannot read a parameter differently.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16      # None: as many as the context leaves
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None      # the sampled token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None

    def body_fields(self, chat: bool) -> dict:
        """The OpenAI body fields that say the same: only those set away from their default (the
        body then reads as a client would write it), and max_tokens always, since the HTTP API's
        default differs between chat and completions."""
        body = {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != f.default}
        body.pop("logprobs", None)
        body["max_tokens"] = self.max_tokens
        if body["max_tokens"] is None:
            del body["max_tokens"]
        if isinstance(self.stop, str):
            body["stop"] = [self.stop]
        if self.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in self.logit_bias.items()}
        if self.logprobs is not None and chat:
            body.update(logprobs=True, top_logprobs=self.logprobs)
        elif self.logprobs is not None:
            body["logprobs"] = self.logprobs
        return body
