"""Token bans, as vLLM applies them before any other logits processing: `allowed_token_ids` (every
other token is masked out) and `bad_words` (a banned sequence's last token is masked out when the
output so far ends with the rest of it; a one-token sequence is masked out everywhere).

Masked logits become -inf, so no sampling mode can pick them; logprobs are computed from the raw
logits before this (as vLLM's are), so they still show what the model itself predicted.
"""
from __future__ import annotations

from typing import Sequence

import torch


def banned_by_bad_words(bad_words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The token ids `bad_words` forbid next, after `output` (the generated ids so far)."""
    banned = []
    for word in bad_words:
        prefix = list(word[:-1])
        if not prefix or list(output[len(output) - len(prefix):]) == prefix:
            banned.append(word[-1])
    return banned


def apply_token_bans(logits: torch.Tensor, seqs) -> torch.Tensor:
    """logits: [S, vocab], one row per sequence of `seqs` (objects with .params.allowed_token_ids,
    .params.bad_words, .token_ids and .num_prompt). Sets every banned entry to -inf, in place (the
    sampler passes its own copy of the rows that need it), and returns `logits`."""
    allowed = [(i, s.params.allowed_token_ids) for i, s in enumerate(seqs)
               if s.params.allowed_token_ids]
    banned = [(i, t) for i, s in enumerate(seqs) if s.params.bad_words
              for t in banned_by_bad_words(s.params.bad_words, s.token_ids[s.num_prompt:])]
    if not allowed and not banned:
        return logits
    device = logits.device
    for row, ids in allowed:
        keep = torch.full((logits.shape[1],), float("-inf"), device=device, dtype=logits.dtype)
        keep[torch.tensor(ids, device=device)] = 0
        logits[row] += keep
    if banned:
        rows, cols = zip(*banned)
        logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = float("-inf")
    return logits
