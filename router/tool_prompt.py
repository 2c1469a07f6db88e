"""Tools for chat templates that cannot render them: SmolLM2's template, like many, has no `tools`
variable and drops an assistant's `tool_calls`, so the model would never learn of the tools it is
offered nor see the calls it made. For such a template the tool definitions go into a system
message (the first one, or a new one) in the tool-call parser's format, and earlier calls into
their assistant message's text in the same format, as llama.cpp's server does for templates
without tool support. router/tokenizer.py:Tokenizer.renders_tools and renders_tool_calls tell
which templates need it (they render a probe and look for it)."""
from __future__ import annotations

import json
import logging

from pagedserve.router.tool_parsers import PARSERS, HermesParser

log = logging.getLogger("pagedserve.router")
DEFAULT_FORMAT = "hermes"  # without --tool-call-parser (tool_choice required or a named function)
_logged: set[str] = set()


def tool_format(parser: str | None):
    return PARSERS.get(parser or DEFAULT_FORMAT, HermesParser)


def log_once(what: str, parser: str | None) -> None:
    if what not in _logged:
        _logged.add(what)
        log.info("the chat template cannot render %s: they go into the prompt's text in the %s "
                 "tool-call format (docs/api.md)", what, parser or DEFAULT_FORMAT)


def with_tool_definitions(messages: list[dict], definitions: list[dict],
                          parser: str | None) -> list[dict]:
    """`messages` with the tools described in the first system message (a new one if none)."""
    log_once("tool definitions", parser)
    text = tool_format(parser).instructions(definitions)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def with_calls_as_text(messages: list[dict], parser: str | None) -> list[dict]:
    """`messages` with each assistant's tool calls written after its text."""
    if not any(m.get("tool_calls") for m in messages):
        return messages
    log_once("tool calls", parser)
    fmt, out = tool_format(parser), []
    for m in messages:
        if m.get("tool_calls"):
            calls = [fmt.format_call(c["function"]["name"], arguments(c)) for c in m["tool_calls"]]
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = "\n".join(filter(None, [m.get("content") or "", *calls]))
        out.append(m)
    return out


def arguments(call: dict) -> dict:
    value = call["function"].get("arguments", {})
    return json.loads(value) if isinstance(value, str) else value
