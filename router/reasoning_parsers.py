"""Reasoning parsers, chosen by vLLM's `--reasoning-parser` name: each choice's text split into the
model's thinking (a `<think>...</think>` block) and its answer, as the text is generated.

Where the block starts depends on the model and its chat template:

- qwen3: Qwen3 writes `<think>` itself, unless its template opened the block in the prompt (the
  thinking-only checkpoints) or closed it there (`chat_template_kwargs: {"enable_thinking":
  false}` puts an empty `<think>\\n\\n</think>` in the prompt): text without a block is answer.
- deepseek_r1: DeepSeek-R1's template opens `<think>` in the prompt, so the output is thinking from
  its first token until `</think>` (a `<think>` the model writes anyway is dropped); an output that
  never closes the block is all thinking, as vLLM's parser has it.

The prompt's text decides the first state: a prompt that ends with `<think>` starts in the
thinking, one that ends with `</think>` in the answer. Newlines after `<think>` and whitespace between `</think>` and
the answer are dropped. Text that may be half a tag is held back while streaming, so the streamed pieces join
to the non-streamed fields.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.router.output import Delta
from pagedserve.router.tool_parsers import longest_prefix_suffix

UNDECIDED, AFTER_START, REASONING, AFTER_END, CONTENT = (
    "undecided", "after_start", "reasoning", "after_end", "content")


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"
    thinks_first: bool = False  # output without a start tag is thinking (deepseek_r1)


PARSERS = {"qwen3": ReasoningFormat(), "deepseek_r1": ReasoningFormat(thinks_first=True)}


def first_state(fmt: ReasoningFormat, prompt_text: str | None) -> str:
    """Where a choice's text starts, from the end of its prompt (the chat template's text)."""
    tail = (prompt_text or "").rstrip()
    if tail.endswith(fmt.end):
        return CONTENT
    return UNDECIDED


class ReasoningOutput:
    """One choice's deltas with the thinking moved from `text` to `reasoning`."""

    def __init__(self, fmt: ReasoningFormat, state: str, thinks_first: bool):
        self.fmt = fmt
        self.state = state
        self.thinks_first = thinks_first  # text without a start tag is thinking
        self.pending = ""  # text held back: it may be (part of) a tag

    def process(self, delta: Delta) -> Delta:
        """The delta with its text split; text still undecided stays until the next one, and the
        last (delta.finish_reason set) releases everything."""
        out = Delta(logprobs=delta.logprobs, finish_reason=delta.finish_reason,
                    tool_calls=delta.tool_calls)
        text, self.pending = self.pending + delta.text, ""
        final = delta.finish_reason is not None
        while text:
            text = self.step(text, out, final)
        return out

    def step(self, text: str, out: Delta, final: bool) -> str:
        """Consumes what it can of `text` into `out`; returns the rest (held back when it
        returns "" with self.pending set)."""
        if self.state == CONTENT:
            out.text += text
            return ""
        if self.state in (AFTER_START, AFTER_END):  # the newlines around the tags are not text
            rest = text.lstrip() if self.state == AFTER_END else text.lstrip("\n")
            if rest:
                self.state = CONTENT if self.state == AFTER_END else REASONING
            return rest
        if self.state == UNDECIDED:
            lead = text.lstrip()
            if lead.startswith(self.fmt.start):
                self.state = AFTER_START
                return lead[len(self.fmt.start):]
            if self.fmt.start.startswith(lead) and not final:
                self.pending = text  # still may become the start tag
                return ""
            self.state = REASONING if self.thinks_first else CONTENT
            return text
        end = text.find(self.fmt.end)
        if end >= 0:
            out.reasoning += text[:end]
            self.state = AFTER_END
            return text[end + len(self.fmt.end):]
        keep = 0 if final else longest_prefix_suffix(text, self.fmt.end)
        out.reasoning += text[:len(text) - keep]
        self.pending = text[len(text) - keep:]
        return ""


@dataclass(frozen=True)
class ThinkFirst:
    """How a constrained reply thinks before its answer (router/thinking_first.py)."""
    start_ids: list[int]  # the parser's tags as token ids
    end_ids: list[int]
    thinking: bool        # the thinking has begun (the prompt opened it, or the parser's rule)


def think_first(parser: str, prompt_text: str | None, encode) -> ThinkFirst | None:
    """The plan for a constrained reply after this prompt; None when it cannot think (the
    prompt closed the block). `encode`: text -> token ids, without special tokens."""
    fmt = PARSERS[parser]
    if first_state(fmt, prompt_text) == CONTENT:
        return None
    opens = (prompt_text or "").rstrip().endswith(fmt.start) or fmt.thinks_first
    return ThinkFirst(encode(fmt.start), encode(fmt.end), opens)


def reasoning_output(parser: str, prompt_text: str | None,
                     constrained: bool = False) -> ReasoningOutput:
    """A choice's ReasoningOutput for `--reasoning-parser parser` after a prompt of this text.
    `constrained`: a structured-output grammar holds the output from its first token (the
    worker applies it to the whole text), so the output is thinking only where the grammar lets
    the model write the start tag itself."""
    fmt = PARSERS[parser]
    opens = (prompt_text or "").rstrip().endswith(fmt.start) or fmt.thinks_first
    return ReasoningOutput(fmt, first_state(fmt, prompt_text), opens and not constrained)
