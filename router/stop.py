"""Stop strings: the output ends just before the first one (or just after it, with vLLM's
include_stop_str_in_output), and no part of it is streamed before it is known to be text.

Text arrives in deltas, so a stop string can be split across them ("<|" now, "end|>" later). Each
push releases only the text that cannot be the beginning of a stop string; the longest tail that
could still grow into one is held back until the next delta decides it.
"""
from __future__ import annotations

from typing import Iterable


class StopStrings:
    def __init__(self, stops: Iterable[str], include_in_output: bool = False):
        self._stops = [s for s in stops if s]
        self._include = include_in_output
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text (vLLM's stop_reason)

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str, can_stop: bool = True) -> tuple[str, bool]:
        """Adds a delta; returns (text safe to emit, whether a stop string matched).

        After a match the returned text ends right before the stop string (right after it when
        it is included in the output) and nothing is held.
        `can_stop` is False while min_tokens is not reached: stop strings do not count yet.
        """
        held = self._held + text
        if not self._stops or not can_stop:
            self._held = ""
            return held, False
        match = first_match(held, self._stops)
        if match is not None:
            self._held = ""
            start, stop = match
            self.matched = stop
            return held[:start + len(stop) if self._include else start], True
        keep = partial_match_length(held, self._stops)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep], False

    def flush(self) -> str:
        """The held tail, once no more text will come (it never became a stop string)."""
        held, self._held = self._held, ""
        return held


def first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in `text` and where it begins, as (index, stop), or None."""
    found = [(i, s) for i, s in ((text.find(s), s) for s in stops) if i >= 0]
    return min(found, key=lambda found: found[0]) if found else None


def partial_match_length(text: str, stops: list[str]) -> int:
    """The length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = min(len(text), max(len(s) for s in stops) - 1)
    for size in range(longest, 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0
