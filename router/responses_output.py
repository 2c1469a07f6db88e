"""OpenAI's Responses API, the output side: a reply's output items (`reasoning`, `message`,
`function_call`), the `response` object around them, and the typed events a streamed reply is
sent as (`response.created` ... `response.completed`, each with its `sequence_number`).

One ReplyBuilder follows one reply: fed the run's deltas (router/run.py; one choice), it returns
the events each adds, and at the end the whole response. A streamed and a plain reply are built
by the same code, so the events reassemble to the plain response.

The text streams as it comes (reasoning first, then the answer); tool calls are known only when
the reply ends (router/tool_calls.py holds back the text that may form one), so each call's
`function_call_arguments.delta` carries its arguments whole.
"""
from __future__ import annotations

import secrets
import time

from pagedserve.router.output import Delta
from pagedserve.router.responses_api import ResponsesRequest
from pagedserve.router.tokenizer import Tokenizer

ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "parallel_tool_calls",
          "previous_response_id", "user", "safety_identifier", "service_tier",
          "prompt_cache_key")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def response_usage(input_tokens: int, output_tokens: int, cached: int,
                   reasoning_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


class ReplyBuilder:
    def __init__(self, request: ResponsesRequest, model: str, tokenizer: Tokenizer,
                 response_id: str | None = None):
        self.request = request
        self.model = model
        self.tokenizer = tokenizer
        self.id = response_id or new_id("resp")
        self.created_at = int(time.time())
        self.sequence = 0
        self.output: list[dict] = []   # the items so far, the open one last
        self.open: dict | None = None  # the reasoning or message item still growing
        self.result = Delta()
        self.usage: dict | None = None
        self.status = "in_progress"  # then "completed" or "incomplete" (finish)

    # ----- events ----------------------------------------------------------------------------

    def event(self, kind: str, **fields) -> dict:
        out = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return out

    def opening(self) -> list[dict]:
        snapshot = self.response("in_progress")
        return [self.event("response.created", response=snapshot),
                self.event("response.in_progress", response=snapshot)]

    def add(self, delta: Delta) -> list[dict]:
        """The events one delta adds: reasoning text, then answer text, each in its own item."""
        self.result.absorb(delta)
        events = []
        if delta.reasoning:
            events += self.grow("reasoning", delta.reasoning)
        if delta.text:
            events += self.grow("message", delta.text)
        return events

    def grow(self, kind: str, text: str) -> list[dict]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self.close()
            events += self.start(kind)
        part = self.open["content"][0]
        part["text"] += text
        name = "output_text" if kind == "message" else "reasoning_text"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self.event(f"response.{name}.delta", item_id=self.open["id"],
                                 output_index=len(self.output) - 1, content_index=0,
                                 delta=text, **extra))
        return events

    def start(self, kind: str) -> list[dict]:
        if kind == "message":
            item = {"id": new_id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        self.open = item
        self.output.append(item)
        index = len(self.output) - 1
        events = [self.event("response.output_item.added", output_index=index,
                             item=copy_item(item))]
        item["content"].append(part)
        if kind == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=index, content_index=0, part=dict(part)))
        return events

    def close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        index, part = len(self.output) - 1, item["content"][0]
        if item["type"] == "message":
            events = [self.event("response.output_text.done", item_id=item["id"],
                                 output_index=index, content_index=0, text=part["text"],
                                 logprobs=[]),
                      self.event("response.content_part.done", item_id=item["id"],
                                 output_index=index, content_index=0, part=dict(part))]
        else:
            events = [self.event("response.reasoning_text.done", item_id=item["id"],
                                 output_index=index, content_index=0, text=part["text"])]
        return events + [self.event("response.output_item.done", output_index=index,
                                    item=copy_item(item))]

    def finish(self, usage: dict) -> list[dict]:
        """The last events: open items closed, the tool calls, the whole response."""
        incomplete = self.result.finish_reason in ("length", "abort")
        events = self.close("incomplete" if incomplete else "completed")
        if not self.output and not self.result.tool_calls:
            events += self.start("message") + self.close("incomplete" if incomplete else "completed")
        for call in self.result.tool_calls:
            events += self.function_call(call)
        self.usage = usage
        self.status = "incomplete" if incomplete else "completed"
        return events + [self.event(f"response.{self.status}",
                                    response=self.response(self.status))]

    def function_call(self, call: dict) -> list[dict]:
        item = {"id": new_id("fc"), "type": "function_call", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": "", "status": "in_progress"}
        self.output.append(item)
        index, arguments = len(self.output) - 1, call["function"]["arguments"]
        events = [self.event("response.output_item.added", output_index=index,
                             item=dict(item)),
                  self.event("response.function_call_arguments.delta", item_id=item["id"],
                             output_index=index, delta=arguments)]
        item.update(arguments=arguments, status="completed")
        return events + [
            self.event("response.function_call_arguments.done", item_id=item["id"],
                       output_index=index, name=item["name"], arguments=arguments),
            self.event("response.output_item.done", output_index=index, item=dict(item))]

    # ----- the response object -----------------------------------------------------------------

    def response(self, status: str) -> dict:
        body = self.request.body
        reason = {"length": "max_output_tokens"}.get(self.result.finish_reason)
        out = {"id": self.id, "object": "response", "created_at": self.created_at,
               "status": status, "error": None,
               "incomplete_details": {"reason": reason} if status == "incomplete" else None,
               "model": self.model, "output": [copy_item(i) for i in self.output],
               "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
               "text": body.get("text") or {"format": {"type": "text"}},
               "truncation": "disabled", "store": self.request.store,
               "metadata": self.request.metadata, "reasoning": None,
               "usage": self.usage if status != "in_progress" else None}
        for name in ECHOED:
            out[name] = body.get(name)
        if out["parallel_tool_calls"] is None:
            out["parallel_tool_calls"] = True
        if status != "in_progress":
            out["completed_at"] = int(time.time())
        return out

    def reasoning_tokens(self) -> int:
        """Tokens of the reasoning text, encoded again (the parser splits text, not tokens)."""
        if not self.result.reasoning:
            return 0
        return len(self.tokenizer.encode(self.result.reasoning, add_special_tokens=False))

    def reply_messages(self) -> list[dict]:
        """The reply as chat messages, for a conversation continued from it (its thinking left
        out, as reasoning models' templates leave out earlier turns' thinking)."""
        message = {"role": "assistant", "content": self.result.text}
        if self.result.tool_calls:
            message["tool_calls"] = [dict(c) for c in self.result.tool_calls]
        return [message]


def copy_item(item: dict) -> dict:
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(p) for p in out["content"]]
    return out
