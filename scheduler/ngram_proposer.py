"""Prompt lookup decoding (Saxena 2023; vLLM's n-gram proposer): the drafts for a sequence are the
tokens that followed the most recent earlier occurrence of its last n tokens, for the largest n in
[prompt_lookup_min, prompt_lookup_max] that occurs earlier. No model runs: a repetitive or
input-grounded output (an edit of the prompt, code that repeats names) gets drafts for free, and a
sequence with no match gets none and decodes as without speculation.
"""
from __future__ import annotations

import numpy as np


def propose_ngram(tokens: list[int], k: int, min_n: int, max_n: int, window: int = 4096) -> list[int]:
    """Up to k tokens to follow `tokens`: those after the latest earlier match of its last n tokens,
    n from max_n down to min_n (the first n with a match wins). Only the last `window` tokens are
    searched, so a long context costs a bounded scan. Empty when nothing matches."""
    if k <= 0 or len(tokens) <= min_n:
        return []
    seq = np.asarray(tokens[-window:], dtype=np.int64)
    length = len(seq)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = seq[length - n:]
        # Candidate starts i (i + n < length: the match ends before the suffix's last token, so at
        # least one token follows it); compare all n columns at once.
        starts = np.flatnonzero(seq[: length - n] == suffix[0])
        if len(starts) == 0:
            continue
        for j in range(1, n):
            starts = starts[seq[starts + j] == suffix[j]]
            if len(starts) == 0:
                break
        if len(starts):
            start = int(starts[-1]) + n  # the latest match: the nearest context is the likeliest
            return seq[start: start + k].tolist()
    return []
