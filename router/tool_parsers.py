"""Tool-call parsers for `tool_choice: "auto"`, chosen by vLLM's `--tool-call-parser` name: each
finds the calls a model wrote in its own format in the text of a finished choice.

hermes: Hermes 2 Pro, Qwen 2.5 / Qwen 3 and others write each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text before the first call is content.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)


def longest_prefix_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (text that may still become it)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class HermesParser:
    start = "<tool_call>"
    calls = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    @staticmethod
    def format_call(name: str, arguments: dict) -> str:
        """A call as the model writes it in this format (for templates that cannot write one)."""
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"

    @staticmethod
    def instructions(definitions: list[dict]) -> str:
        """The tools and how to call them, for a system message (for templates that cannot
        render `tools`)."""
        listed = "\n".join(json.dumps(d, ensure_ascii=False) for d in definitions)
        return ("# Tools\n\nYou can call the functions described below, one JSON object each, "
                f"between <tools> and </tools>:\n<tools>\n{listed}\n</tools>\n\n"
                "To call one, write its name and a JSON object of its arguments between "
                "<tool_call> and </tool_call>, as in:\n"
                + HermesParser.format_call("function_name", {"argument": "value"}))

    def parse(self, text: str) -> tuple[int, list[ParsedCall]]:
        """(where the content ends, the calls); no calls when any of them is not valid JSON with
        a name: then the whole text is content, as vLLM's parser leaves it."""
        start = text.find(self.start)
        if start < 0:
            return len(text), []
        calls = []
        for body in self.calls.findall(text, start):
            try:
                call = json.loads(body)
            except json.JSONDecodeError:
                return len(text), []
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                return len(text), []
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append(ParsedCall(call["name"], arguments))
        return start, calls


PARSERS = {"hermes": HermesParser}
