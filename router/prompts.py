"""Prompts as the scheduler takes them (token ids), from what OpenAI clients send: a completion's
`prompt` in its four forms, or a chat's `messages` through the chat template."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedserve.router.errors import invalid
from pagedserve.router.fields import is_int
from pagedserve.router.tokenizer import Tokenizer
from pagedserve.router.tool_prompt import with_calls_as_text, with_tool_definitions

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # as given; None when the client sent token ids
    logprobs: list | None = None  # scheduler_pb2.PromptLogprob for positions 1.., once received


def completion_prompts(value: Any, tokenizer: Tokenizer, vocab_size: int,
                       add_special_tokens: bool = True) -> list[Prompt]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and value and all(is_int(v) for v in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise invalid("prompt", "'prompt' must be a non-empty string, array of strings, array of "
                      "token ids, or array of arrays of token ids.")
    prompts = [one_prompt(item, tokenizer, vocab_size, add_special_tokens) for item in items]
    if any(not p.token_ids for p in prompts):
        raise invalid("prompt", "'prompt' must not be empty.")
    return prompts


def one_prompt(item: Any, tokenizer: Tokenizer, vocab_size: int,
               add_special_tokens: bool) -> Prompt:
    if isinstance(item, str):
        return Prompt(tokenizer.encode(item, add_special_tokens), item)
    if isinstance(item, list) and all(is_int(v) for v in item):
        check_token_ids(item, vocab_size, "prompt")
        return Prompt(list(item))
    raise invalid("prompt", "Each prompt must be a string or an array of token ids.")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(param, f"Token id {bad} in '{param}' is outside the vocabulary "
                      f"[0, {vocab_size}).")


def chat_messages(value: Any) -> list[dict]:
    """`messages` checked and reduced to what chat templates read: role and string content."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "'messages' must be a non-empty array of messages.")
    return [chat_message(i, m) for i, m in enumerate(value)]


def chat_message(i: int, message: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, f"'{where}' must be an object with 'role' and 'content'.")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None  # a list is unhashable
    if role not in ROLES:
        raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}; got "
                      f"{message.get('role')!r}.")
    out = {"role": role, "content": message_text(where, role, message.get("content"))}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    out.update(tool_fields(where, role, message))
    return out


def message_text(where: str, role: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None and role in ("assistant", "tool"):
        return ""
    if not isinstance(content, list):
        raise invalid(f"{where}.content", f"'{where}.content' must be a string or an array of "
                      "text parts.")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise invalid(f"{where}.content[{j}]", f"'{where}.content[{j}]' must be "
                          '{"type": "text", "text": "..."}: this model reads text only.')
        texts.append(part["text"])
    return "\n".join(texts)  # vLLM's joining of text parts, so prompts match across servers


def chat_prompt(messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                continue_final_message: bool = False, add_special_tokens: bool = False,
                template_kwargs: dict | None = None, tools: list[dict] | None = None,
                tool_parser: str | None = None) -> Prompt:
    """The chat as a prompt. `continue_final_message` leaves the last message (the assistant's)
    open for the model to continue, as vLLM does; raises a 400 when the last message is not the
    assistant's. A template that cannot render `tools` or earlier tool calls gets them as text,
    in `tool_parser`'s format (router/tool_prompt.py)."""
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise invalid("continue_final_message", "'continue_final_message' needs the last message "
                      f"to be the assistant's; it is the {messages[-1]['role']}'s.")
    if tools and not tokenizer.renders_tools:
        messages, tools = with_tool_definitions(messages, tools, tool_parser), None
    if not tokenizer.renders_tool_calls:
        messages = with_calls_as_text(messages, tool_parser)
    text = tokenizer.render_chat(messages, add_generation_prompt, continue_final_message,
                                 template_kwargs or {}, tools)
    # The template already wrote the special tokens (BOS, role markers): by default add none again.
    return Prompt(tokenizer.encode(text, add_special_tokens=add_special_tokens), text)


def truncate_prompts(prompts: list[Prompt], keep: int) -> list[Prompt]:
    """Each prompt cut to its last `keep` tokens (vLLM's truncate_prompt_tokens); a cut prompt
    loses its text, which no longer matches its ids."""
    return [p if len(p.token_ids) <= keep else Prompt(p.token_ids[-keep:]) for p in prompts]


def tool_fields(where: str, role: str, message: dict) -> dict:
    """A tool result's `tool_call_id`, an assistant's `tool_calls` with their arguments as objects
    (chat templates write them out with `tojson`; OpenAI sends them as JSON text)."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        return {"tool_call_id": call_id} if isinstance(call_id, str) else {}
    calls = message.get("tool_calls")
    if role != "assistant" or calls is None:
        return {}
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls", f"'{where}.tool_calls' must be an array.")
    return {"tool_calls": [template_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]}


def template_call(where: str, call) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        raise invalid(where, f"'{where}.function.arguments' is not valid JSON.") from None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(arguments, dict)):
        raise invalid(where, f"'{where}' must be {{\"id\", \"type\": \"function\", \"function\": "
                      "{\"name\", \"arguments\"}}.")
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}
