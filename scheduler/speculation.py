"""Speculative decoding in the scheduler: which decoding sequences get drafts, how many, and the
counters behind vLLM's spec_decode metrics. The drafts travel in the plan
(ScheduledSequence.draft_token_ids) as extra query tokens; the worker verifies them all in the
step's one forward pass and answers with the accepted ones (StepResult.accepted). With the
draft_model method the scheduler sends placeholder ids: the worker's draft model writes the
tokens (worker/draft_model.py); the count and the KV slots are decided here as for n-gram.

A sequence gets no drafts where they could not be verified exactly or would be wasted: prompt
logprobs, pooling, a step of it still
in flight (async scheduling: its length is unknown until that result), or too little room left
before max_tokens or max_model_len. It then decodes one token, in the same batch as the others.
"""
from __future__ import annotations

from .ngram_proposer import propose_ngram
from .request import Sequence
from .speculative_config import SpeculativeConfig, parse_speculative_config


class Speculator:
    def __init__(self, config_text: str | None, max_model_len: int):
        self.config: SpeculativeConfig | None = parse_speculative_config(config_text)
        self.max_model_len = max_model_len
        k = self.config.num_speculative_tokens if self.config else 0
        self.num_drafts = 0          # steps in which a sequence had drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_per_pos = [0] * k

    def drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for seq's next step, which computes its one last token (a decode): at most
        budget - 1, and none past max_tokens or max_model_len."""
        config = self.config
        if seq.num_scheduled or not self.speculates(seq):
            return []
        room = min(config.num_speculative_tokens, budget - 1,
                   seq.request.limits.max_tokens - seq.num_output - 1,
                   self.max_model_len - seq.num_tokens)
        if room <= 0:
            return []
        if config.method == "draft_model":  # placeholders: the worker's draft model writes them
            return [0] * room
        return propose_ngram(seq.token_ids, room, config.prompt_lookup_min, config.prompt_lookup_max)

    def speculates(self, seq: Sequence) -> bool:
        """Whether seq's decodes propose drafts (then async scheduling does not run it ahead)."""
        return self.config is not None and self.eligible(seq)

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        request = seq.request
        return not (request.num_prompt_logprobs is not None or request.pooling is not None)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One verified sequence-step: num_drafts proposed, the first num_accepted accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.num_accepted_per_pos[pos] += 1
