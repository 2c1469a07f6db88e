"""One choice's output as it is generated: token ids from the scheduler in, text deltas out.

ChoiceOutput is the one output type of the generation path, vLLM's CompletionOutput built
incrementally: the token ids, text, logprobs, cumulative logprob, finish and stop reasons of one
choice. The HTTP API shapes each Delta (what one scheduler message added) as OpenAI JSON or a
streamed chunk (router/responses.py); the offline API reads the whole ChoiceOutput
(pagedserve/entrypoints/outputs.py), never the JSON.

Each token is detokenized, then passed through the stop strings; the tokens kept (for usage and
token_ids) stop at the token that completed a stop string. A sequence the scheduler ends on EOS or
a stop token id does not show that token's text, as in OpenAI's and vLLM's outputs, but keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.detokenizer import IncrementalDetokenizer
from pagedserve.router.stop import StopStrings

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_ABORT: "abort"}

# JSON has no -inf; a token the model rules out entirely still needs a number (vLLM's choice).
MIN_LOGPROB = -9999.0


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


@dataclass
class TextLogprob:
    """A token's logprob as the text APIs show it: the scheduler's pb.TokenLogprob (or, echoed,
    pb.PromptLogprob) placed in the choice's text, its alternatives as (token id, logprob)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    text_offset: int  # where the token's text starts in the choice's text


@dataclass
class Delta:
    text: str = ""
    logprobs: list[TextLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's, whole (router/tool_calls.py)
    reasoning: str = ""  # the thinking, with --reasoning-parser (router/reasoning_parsers.py)

    def __bool__(self) -> bool:
        return bool(self.text or self.logprobs or self.finish_reason or self.tool_calls
                    or self.reasoning)

    def absorb(self, later: "Delta") -> None:
        """Appends a later delta of the same choice (to build a non-streamed response)."""
        self.text += later.text
        self.reasoning += later.reasoning
        self.logprobs.extend(later.logprobs)
        self.tool_calls.extend(later.tool_calls)
        self.finish_reason = later.finish_reason or self.finish_reason


class ChoiceOutput:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop: StopStrings,
                 hidden_stop_ids: frozenset[int], min_tokens: int = 0,
                 stop_token_ids: frozenset[int] = frozenset()):
        self._detokenizer = detokenizer
        self._stop = stop
        self._hidden_stop_ids = hidden_stop_ids
        self._stop_token_ids = stop_token_ids
        self._min_tokens = min_tokens
        self._decoded_chars = 0        # characters the detokenizer has produced so far
        self._text: list[str] = []     # the deltas' text, joined on demand
        self.token_ids: list[int] = []  # every kept token, the hidden stop token too
        self.logprobs: list[TextLogprob] = []  # one per kept token, when they were asked for
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        # vLLM's: the stop string or stop token id that ended the choice; None for EOS or length
        self.stop_reason: str | int | None = None
        self.stopped_here = False      # a stop string ended it: the scheduler must be told

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Completion tokens, for usage."""
        return len(self.token_ids)

    @property
    def text(self) -> str:
        """The text so far: every delta's, in order (without any echo or tool-call parsing)."""
        if len(self._text) > 1:
            self._text[:] = ["".join(self._text)]
        return self._text[0] if self._text else ""

    def add(self, message: pb.GenerateResponse) -> Delta:
        """The text and logprobs one scheduler message adds (empty once the choice is finished)."""
        delta = Delta()
        if self.finished:
            return delta  # tokens the scheduler made before it learnt of our stop string
        # Each protobuf field read builds a wrapper: read them once (this runs per token).
        ids, logprobs, reason = list(message.token_ids), message.logprobs, message.finish_reason
        last, ends_on_stop_token = len(ids) - 1, reason == pb.FINISH_REASON_STOP
        for k, token_id in enumerate(ids):
            self.token_ids.append(token_id)
            # Logprobs keep every token, the hidden stop token too (as vLLM's): lm-eval drops the
            # last entry of an echoed completion as the generated one.
            if logprobs and k < len(logprobs):
                self._add_logprob(text_logprob(logprobs[k], self._decoded_chars), delta)
            if k == last and ends_on_stop_token and token_id in self._hidden_stop_ids:
                break
            if self._push(self._detokenizer.add(token_id), delta):
                self.finish_reason, self.stopped_here = "stop", True
                return self._emit(delta)
        if reason != pb.FINISH_REASON_UNSPECIFIED:
            if self._push(self._detokenizer.flush(), delta):
                self.finish_reason = "stop"
                return self._emit(delta)
            delta.text += self._stop.flush()
            self.finish_reason = delta.finish_reason = FINISH_REASONS[reason]
            if self.finish_reason == "stop" and ids and ids[-1] in self._stop_token_ids:
                self.stop_reason = ids[-1]
        return self._emit(delta)

    def abandon(self) -> Delta:
        """The scheduler's stream ended without finishing this choice."""
        self.finish_reason = "abort"
        return self._emit(Delta(self._stop.flush(), finish_reason="abort"))

    def _add_logprob(self, logprob: TextLogprob, delta: Delta) -> None:
        self.logprobs.append(logprob)
        delta.logprobs.append(logprob)
        self.cumulative_logprob += logprob.logprob

    def _emit(self, delta: Delta) -> Delta:
        if delta.text:
            self._text.append(delta.text)
        return delta

    def _push(self, text: str, delta: Delta) -> bool:
        self._decoded_chars += len(text)
        released, matched = self._stop.push(text, can_stop=self.num_tokens >= self._min_tokens)
        delta.text += released
        if matched:
            delta.finish_reason = "stop"
            self.stop_reason = self._stop.matched
        return matched


def text_logprob(lp: pb.TokenLogprob, text_offset: int) -> TextLogprob:
    return TextLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top],
                       text_offset)
