"""OpenAI's Responses API, the request side: a `POST /v1/responses` body checked field by field and
turned into the chat request it amounts to, so one parser (router/protocol.py:parse_chat) checks
the sampling fields, renders the conversation through the chat template and builds the tools' and
`text.format`'s constraints.

`input` (a string, or message, `function_call`, `function_call_output` and `reasoning` items) and
`instructions` become chat messages; a conversation continued with `previous_response_id` starts
with the stored one's messages (router/response_store.py). Each field follows a policy as the chat
endpoint's do (router/field_policy.py); docs/api.md lists them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pagedserve.router.errors import APIError, invalid
from pagedserve.router.field_policy import (Policy, accepted, check_fields, check_keys, honoured,
                                            refused)
from pagedserve.router.fields import Fields
from pagedserve.router.model import ServedModel
from pagedserve.router.protocol import GenerationRequest, parse_chat

RESPONSES = ("responses",)


def unset_or_empty(value: Any) -> bool:
    return value in (None, [], {})


def disabled(value: Any) -> bool:
    return value in (None, "disabled")


def zero_or_unset(value: Any) -> bool:
    return value in (None, 0)


def false_or_unset(value: Any) -> bool:
    return value in (None, False)


FIELDS: dict[str, Policy] = {
    "model": honoured(RESPONSES), "input": honoured(RESPONSES),
    "instructions": honoured(RESPONSES), "max_output_tokens": honoured(RESPONSES),
    "temperature": honoured(RESPONSES), "top_p": honoured(RESPONSES),
    "tools": honoured(RESPONSES), "tool_choice": honoured(RESPONSES),
    "parallel_tool_calls": honoured(RESPONSES), "text": honoured(RESPONSES),
    "stream": honoured(RESPONSES), "stream_options": honoured(RESPONSES),
    "store": honoured(RESPONSES), "previous_response_id": honoured(RESPONSES),
    "metadata": honoured(RESPONSES),
    "user": accepted(str, RESPONSES), "safety_identifier": accepted(str, RESPONSES),
    "service_tier": accepted(str, RESPONSES), "prompt_cache_key": accepted(str, RESPONSES),
    "prompt_cache_retention": accepted(str, RESPONSES),
    "prompt_cache_options": accepted(dict, RESPONSES),
    "background": refused("background responses", false_or_unset, RESPONSES),
    "background_options": refused("background responses", endpoints=RESPONSES),
    "conversation": refused("conversations (use previous_response_id)", endpoints=RESPONSES),
    "include": refused("extra output data (include)", unset_or_empty, RESPONSES),
    "max_tool_calls": refused("a cap on hosted tool calls", endpoints=RESPONSES),
    "prompt": refused("stored prompt templates", endpoints=RESPONSES),
    "reasoning": refused("reasoning effort or summaries (start the server with "
                         "--reasoning-parser to get the model's own reasoning)", unset_or_empty,
                         RESPONSES),
    "top_logprobs": refused("logprobs in the Responses API", zero_or_unset, RESPONSES),
    "truncation": refused("truncation of the conversation", disabled, RESPONSES),
    "context_management": refused("context management", unset_or_empty, RESPONSES),
    "moderation": refused("moderation", endpoints=RESPONSES),
    "image": refused("image generation", endpoints=RESPONSES),
    "access_programs": refused("access programs", endpoints=RESPONSES),
}
STREAM_OPTIONS = ("include_obfuscation",)  # a hosted service's padding against side channels
TEXT_KEYS = ("format", "verbosity")
FORMAT_KEYS = {"text": ("type",), "json_object": ("type",),
               "json_schema": ("type", "name", "schema", "strict", "description")}
TOOL_KEYS = ("type", "name", "description", "parameters", "strict")
ITEM_KEYS = {
    "message": ("type", "role", "content", "id", "status", "phase"),
    "function_call": ("type", "id", "call_id", "name", "arguments", "status"),
    "function_call_output": ("type", "id", "call_id", "output", "status"),
    "reasoning": ("type", "id", "summary", "content", "encrypted_content", "status"),
}
PART_TYPES = ("input_text", "output_text", "text")
PART_KEYS = ("type", "text", "annotations", "logprobs")
# The chat fields the errors of parse_chat name, as this endpoint's fields.
CHAT_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format"}


@dataclass
class ResponsesRequest:
    body: dict                    # the request as sent (its echoes go into the response object)
    chat: GenerationRequest       # what runs
    messages: list[dict]          # the conversation before the reply, instructions left out
    store: bool
    previous_response_id: str | None
    metadata: dict = field(default_factory=dict)


def parse_responses(body: Any, model: ServedModel, history: list[dict]) -> ResponsesRequest:
    """The body checked and turned into a chat request after `history` (the stored messages of
    `previous_response_id`, else []). Raises APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.")
    check_fields(body, "responses", FIELDS)
    f = Fields(body)
    store = f.boolean("store", True)
    metadata = f.object("metadata")
    check_keys(f.object("stream_options"), "stream_options", STREAM_OPTIONS)
    if f.given("stream_options") and not f.boolean("stream", False):
        raise invalid("stream_options", "'stream_options' is only allowed with 'stream': true.")
    messages = history + input_messages(f.raw("input"))
    instructions = f.string("instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    chat = {"model": body.get("model"), "messages": system + messages,
            "stream": f.boolean("stream", False)}
    for name, chat_name in (("max_output_tokens", "max_completion_tokens"),
                            ("temperature", "temperature"), ("top_p", "top_p"),
                            ("parallel_tool_calls", "parallel_tool_calls")):
        if f.given(name):
            chat[chat_name] = body[name]
    if f.given("tools"):
        chat["tools"] = chat_tools(f.raw("tools"))
    if f.given("tool_choice"):
        chat["tool_choice"] = chat_tool_choice(f.raw("tool_choice"))
    response_format = text_format(f.object("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    try:
        req = parse_chat(chat, model)
    except APIError as err:
        raise renamed(err) from None
    return ResponsesRequest(body, req, messages, store, f.string("previous_response_id"),
                            metadata)


def renamed(err: APIError) -> APIError:
    """parse_chat's error about a chat field, naming the field this endpoint calls it by (a
    message's index is left out: instructions and a stored conversation shift it)."""
    if err.param:
        for chat_name, name in CHAT_PARAMS.items():
            if err.param == chat_name or err.param.startswith(chat_name + "["):
                err.message = re.sub(rf"'{chat_name}(\[\d+\])?", f"'{name}", err.message)
                err.param = name
    return err


def input_messages(value: Any) -> list[dict]:
    """`input` as chat messages: a string is one user message; items become messages in order, a
    run of `function_call` items one assistant message with its tool calls."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("input", "'input' must be a string or a non-empty array of input items.")
    messages: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"'{where}' must be an input item (an object).")
        kind = item.get("type", "message")
        if kind not in ITEM_KEYS:
            raise invalid(f"{where}.type", f"'{where}.type' {kind!r} is not supported: this "
                          "server takes message, function_call, function_call_output and "
                          "reasoning items.")
        check_keys(item, where, ITEM_KEYS[kind])
        if kind == "message":
            messages.append({"role": item.get("role"), "content": item_text(where, item)})
        elif kind == "function_call":
            add_call(messages, where, item)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": string(item, "call_id", where),
                             "content": call_output(where, item.get("output"))})
        # reasoning items (a previous output replayed): reasoning models' templates drop the
        # thinking of earlier turns, so it is not put back into the prompt
    return messages


def string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key}", f"'{where}.{key}' must be a string.")
    return value


def item_text(where: str, item: dict) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content", f"'{where}.content' must be a string or an array of "
                      "text parts.")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not (isinstance(part, dict) and part.get("type") in PART_TYPES
                and isinstance(part.get("text"), str)):
            raise invalid(at, f"'{at}' must be {{\"type\": \"input_text\", \"text\": ...}}: this "
                          "model reads text only.")
        check_keys(part, at, PART_KEYS)
        texts.append(part["text"])
    return "\n".join(texts)


def call_output(where: str, output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return item_text(where, {"content": output}).replace(f"{where}.content", f"{where}.output")
    raise invalid(f"{where}.output", f"'{where}.output' must be a string or text parts.")


def add_call(messages: list[dict], where: str, item: dict) -> None:
    """A function_call item: a tool call of the assistant message before it, or a new one."""
    call = {"id": string(item, "call_id", where), "type": "function",
            "function": {"name": string(item, "name", where),
                         "arguments": string(item, "arguments", where)}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":  # a copy: it may be a stored message
        messages[-1] = {**last, "tool_calls": [*last.get("tool_calls", []), call]}
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def chat_tools(tools: Any) -> list:
    """Responses tools ({type: function, name, parameters, ...}) in the chat API's shape."""
    if not isinstance(tools, list):
        raise invalid("tools", "'tools' must be an array of tools.")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid(where, f"'{where}' is a {kind!r} tool: this server calls only function "
                          "tools ({\"type\": \"function\", \"name\": ..., \"parameters\": ...}).")
        check_keys(tool, where, TOOL_KEYS)
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        check_keys(choice, "tool_choice", ("type", "name"))
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict):
        raise invalid("tool_choice", f"'tool_choice' of type {choice.get('type')!r} is not "
                      "supported: give 'none', 'auto', 'required' or "
                      '{"type": "function", "name": ...}.')
    return choice


def text_format(text: dict) -> dict | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    check_keys(text, "text", TEXT_KEYS)
    if text.get("verbosity") is not None:
        raise invalid("text.verbosity", "'text.verbosity' is not supported: this server does "
                      "not do verbosity control.")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in FORMAT_KEYS:
        raise invalid("text.format", "'text.format' must be {\"type\": \"text\"}, "
                      "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"name\": ..., "
                      "\"schema\": {...}}.")
    check_keys(fmt, "text.format", FORMAT_KEYS[fmt["type"]])
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}
