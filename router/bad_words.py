"""vLLM's `bad_words`: words as the token sequences the worker bans (worker/token_bans.py).

A word is encoded twice, as vLLM does, so it is banned at the start of the text and after a space:
once as written (leading spaces dropped) and once with one leading space, the second kept only when
the space makes a different first token and no extra tokens (else it would ban a different split).
"""
from __future__ import annotations

from pagedserve.router.errors import invalid
from pagedserve.router.tokenizer import Tokenizer


def bad_words_token_ids(words: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each word's banned token-id sequences; raises a 400 naming `bad_words` for a blank word."""
    sequences = []
    for word in words:
        if not word.strip():
            raise invalid("bad_words", "'bad_words' must not hold empty or blank words.")
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        sequences.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return sequences
