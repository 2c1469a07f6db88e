"""Incremental detokenization: token ids in, text deltas out, never half a character.

A byte-level BPE token can hold part of a UTF-8 character (a Chinese character or an emoji is often
split over two or three tokens); decoded alone it gives U+FFFD. Decoding token by token would stream
those replacement characters. Instead we keep two offsets into the ids (vLLM's and TGI's technique):

    ids:  ... [prefix_offset ........ read_offset ........ end]
               `-- already emitted --'`-- not yet emitted --'

Each step decodes the window from prefix_offset twice, with and without the unread tokens; the
difference is the new text. It is emitted only once it does not end in U+FFFD (the character is
complete), and then both offsets move forward so the window stays a few tokens long. Bytes of a
character still unfinished when the sequence ends are never shown (as in vLLM): text ends only on
whole characters.
"""
from __future__ import annotations

from typing import Callable, Sequence

# Tokens of context taken from the end of the prompt: decoding the first output token after a few
# real ones gives it the leading space a SentencePiece tokenizer would strip from a text's start.
CONTEXT_TOKENS = 5

REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_ids: Sequence[int] = ()):
        self._decode = decode
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes: "" while a character is still partial."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of a sequence: the whole characters still held, without the bytes of a
        character the sequence ended inside of."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._decode(self._ids[self._prefix_offset:])
        if final:
            window = window.rstrip(REPLACEMENT_CHAR)
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window[len(emitted):]
