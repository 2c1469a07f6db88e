"""OpenAI tool calling: the request's `tools`, `tool_choice` and `parallel_tool_calls`, the
constraint that enforces `required` and named choices, and each choice's text turned into
`tool_calls` as it is generated.

`required` and a named function are enforced by the grammar, as vLLM does: the output must be a JSON
array of `{"name", "parameters"}` objects (one of the tools each; at most one with
`parallel_tool_calls: false`), or the named function's arguments object. `auto` lets the model
write what it likes and parses calls out of its text with the `--tool-call-parser`.

Text that may belong to a call is held back while streaming; the calls go out in one delta each
when the choice finishes, so streamed deltas reassemble to the non-streamed message.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.errors import invalid
from pagedserve.router.fields import Fields
from pagedserve.router.output import Delta
from pagedserve.router.structured_outputs import Constraint
from pagedserve.router.tool_parsers import PARSERS, ParsedCall, longest_prefix_suffix

CHOICES = ("none", "auto", "required")


@dataclass
class Tools:
    definitions: list[dict]       # as the client sent them: the chat template renders these
    functions: dict[str, dict]    # name -> parameters (a JSON schema)
    choice: str                   # "none", "auto", "required" or "named"
    named: str | None             # the function tool_choice names
    parallel: bool
    parser: str | None            # --tool-call-parser, for "auto"

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none"


def parse_tools(f: Fields, parser: str | None) -> Tools | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; None when no tools are given."""
    definitions = f.raw("tools", [])
    if not isinstance(definitions, list):
        raise invalid("tools", "'tools' must be an array of tools.")
    if not definitions:
        if f.given("tool_choice") and f.raw("tool_choice") != "none":
            raise invalid("tool_choice", "'tool_choice' needs 'tools'.")
        return None
    functions = dict(function_of(i, tool) for i, tool in enumerate(definitions))
    choice, named = tool_choice(f.raw("tool_choice", "auto"), functions)
    if choice == "auto" and parser is None:
        raise invalid("tool_choice", '"auto" tool choice requires the server to run with '
                      "--enable-auto-tool-choice and --tool-call-parser; use 'required', a "
                      "named function or 'none'.")
    return Tools(definitions, functions, choice, named, f.boolean("parallel_tool_calls", True),
                 parser)


def function_of(i: int, tool) -> tuple[str, dict]:
    where = f"tools[{i}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
            and isinstance(function.get("name"), str) and function["name"]):
        raise invalid(where, f"'{where}' must be {{\"type\": \"function\", \"function\": "
                      "{\"name\": ..., \"parameters\": {...}}}.")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise invalid(where, f"'{where}.function.parameters' must be a JSON schema object.")
    return function["name"], parameters


def tool_choice(value, functions: dict[str, dict]) -> tuple[str, str | None]:
    if value in CHOICES:
        return value, None
    name = value.get("function", {}).get("name") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and value.get("type") == "function" and isinstance(name, str)):
        raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                      '{"type": "function", "function": {"name": ...}}.')
    if name not in functions:
        raise invalid("tool_choice", f"'tool_choice' names {name!r}, which is not in 'tools'.")
    return "named", name


def tool_constraint(tools: Tools | None) -> Constraint | None:
    """The grammar that enforces `required` or a named function; None for `auto` and `none`."""
    if tools is None or tools.choice not in ("required", "named"):
        return None
    if tools.choice == "named":
        schema = tools.functions[tools.named]
    else:
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                   "parameters": parameters},
                  "required": ["name", "parameters"]}
                 for name, parameters in tools.functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not tools.parallel:
            schema["maxItems"] = 1
    return Constraint(pb.StructuredOutputParams(json=json.dumps(schema)), "tools")


def parse_constrained(tools: Tools, text: str, finish_reason: str) -> list[ParsedCall]:
    """The calls in a `required` or named choice's output. A `required` array that max_tokens cut
    short still gives the calls it completed (a small model may repeat calls until the limit);
    a named call cut short gives none."""
    if tools.choice == "required":
        return [ParsedCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                for c in complete_items(text)]
    try:
        value = json.loads(text) if finish_reason == "stop" else None
    except json.JSONDecodeError:
        return []
    return [ParsedCall(tools.named, json.dumps(value, ensure_ascii=False))] if value else []


def complete_items(text: str) -> list:
    """The items of the JSON array `text` that are complete, the array itself finished or not."""
    decoder = json.JSONDecoder()
    items, pos = [], text.find("[") + 1
    while 0 < pos < len(text):
        while pos < len(text) and text[pos] in " \t\n\r,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        items.append(item)
    return items


class ToolCallOutput:
    """One choice's deltas, with the text that forms tool calls taken out and, when the choice
    finishes, the calls put in (finish_reason "tool_calls")."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self.parser = PARSERS[tools.parser]() if tools.choice == "auto" else None
        self.text = ""
        self.released = 0  # characters of text already passed on as content

    def process(self, delta: Delta) -> Delta:
        self.text += delta.text
        out = Delta(logprobs=delta.logprobs, finish_reason=delta.finish_reason,
                    reasoning=delta.reasoning)  # calls are parsed from the answer alone
        if delta.finish_reason is None:
            out.text = self.release(self.safe_end())
            return out
        content_end, calls = self.parse(delta.finish_reason)
        out.text = self.release(content_end if calls else len(self.text))
        if calls:
            out.tool_calls = [tool_call(c) for c in calls]
            if delta.finish_reason == "stop":
                out.finish_reason = "tool_calls"  # "length" stays: the output was cut short
        return out

    def release(self, end: int) -> str:
        text = self.text[self.released:end]
        self.released = max(self.released, end)
        return text

    def safe_end(self) -> int:
        """How much text cannot be part of a call, whatever comes next."""
        if self.parser is None:
            return 0  # constrained: the whole output is the call
        start = self.text.find(self.parser.start)
        if start >= 0:
            return start
        return len(self.text) - longest_prefix_suffix(self.text, self.parser.start)

    def parse(self, finish_reason: str) -> tuple[int, list[ParsedCall]]:
        if self.parser is None:
            return 0, parse_constrained(self.tools, self.text, finish_reason)
        return self.parser.parse(self.text) if finish_reason == "stop" else (len(self.text), [])


def tool_call(call: ParsedCall) -> dict:
    return {"id": f"chatcmpl-tool-{secrets.token_hex(16)}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
