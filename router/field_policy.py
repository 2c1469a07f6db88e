"""Which request fields /v1/completions and /v1/chat/completions know, and what each one gets.

Every field of OpenAI's API reference for the two endpoints and of vLLM's extras is in FIELDS, with
one of three rules (docs/api.md explains each field):

- HONOURED: it takes effect; router/protocol.py reads and checks it.
- ACCEPTED: it has no meaning for a local server (billing, storage, abuse monitoring, caching
  hints): its type is checked and it changes nothing.
- REFUSED: the server cannot do what it asks, so any value other than the harmless ones is a 400
  naming it (a client must not believe it got, say, audio or beam search). A deprecated field
  whose current form the server honours (`functions`: `tools`) is refused with that form's name.

A field in neither list is a 400 naming it, with OpenAI's own message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.router.errors import invalid
from pagedserve.router.fields import type_name

HONOURED, ACCEPTED, REFUSED = "honoured", "accepted", "refused"
BOTH, CHAT, COMPLETION = ("chat", "completion"), ("chat",), ("completion",)


def unset(value: Any) -> bool:
    return value is None


def false_or_unset(value: Any) -> bool:
    return value is None or value is False


def text_only(value: Any) -> bool:
    return value is None or value == ["text"]


def zero(value: Any) -> bool:
    return value is None or value == 0


def one(value: Any) -> bool:
    return value is None or value == 1


@dataclass(frozen=True)
class Policy:
    rule: str
    endpoints: tuple[str, ...] = BOTH
    kind: type | None = None                      # ACCEPTED fields: the JSON type they must have
    can_do: Callable[[Any], bool] = unset         # REFUSED fields: the values that ask nothing
    why: str = ""                                 # REFUSED fields: what the server cannot do
    use: str = ""                                 # REFUSED fields: the current form it honours


def honoured(endpoints: tuple[str, ...] = BOTH) -> Policy:
    return Policy(HONOURED, endpoints)


def accepted(kind: type, endpoints: tuple[str, ...] = BOTH) -> Policy:
    return Policy(ACCEPTED, endpoints, kind=kind)


def refused(why: str, can_do: Callable[[Any], bool] = unset,
            endpoints: tuple[str, ...] = BOTH) -> Policy:
    return Policy(REFUSED, endpoints, can_do=can_do, why=why)


def deprecated(use: str, endpoints: tuple[str, ...] = BOTH) -> Policy:
    """A field OpenAI replaced with `use`, which the server honours: refused, naming `use`."""
    return Policy(REFUSED, endpoints, use=use)


FIELDS: dict[str, Policy] = {
    # OpenAI, both endpoints
    "model": honoured(), "stream": honoured(), "stream_options": honoured(), "n": honoured(),
    "max_tokens": honoured(), "temperature": honoured(), "top_p": honoured(), "seed": honoured(),
    "presence_penalty": honoured(), "frequency_penalty": honoured(), "logit_bias": honoured(),
    "stop": honoured(), "logprobs": honoured(), "best_of": honoured(),
    "user": accepted(str),
    # OpenAI, completions
    "prompt": honoured(COMPLETION), "echo": honoured(BOTH), "suffix": honoured(COMPLETION),
    # OpenAI, chat
    "messages": honoured(CHAT), "max_completion_tokens": honoured(CHAT),
    "top_logprobs": honoured(CHAT),
    "tools": honoured(CHAT), "tool_choice": honoured(CHAT), "parallel_tool_calls": honoured(CHAT),
    "response_format": honoured(BOTH),
    "store": accepted(bool, CHAT), "metadata": accepted(dict, CHAT),
    "service_tier": accepted(str, CHAT), "safety_identifier": accepted(str, CHAT),
    "prompt_cache_key": accepted(str, CHAT), "prompt_cache_retention": accepted(str, CHAT),
    "prompt_cache_options": accepted(dict, CHAT), "prediction": accepted(dict, CHAT),
    "audio": refused("audio output", endpoints=CHAT),
    "modalities": refused("output modalities other than [\"text\"]", text_only, CHAT),
    "functions": deprecated("tools", CHAT),
    "function_call": deprecated("tool_choice", CHAT),
    "web_search_options": refused("web search", endpoints=CHAT),
    "reasoning_effort": refused("reasoning effort (this is not a reasoning model)",
                                endpoints=CHAT),
    "verbosity": refused("verbosity control", endpoints=CHAT),
    "moderation": refused("moderation", endpoints=CHAT),
    # vLLM's sampling extras
    "top_k": honoured(), "min_p": honoured(), "repetition_penalty": honoured(),
    "min_tokens": honoured(), "stop_token_ids": honoured(), "ignore_eos": honoured(),
    "include_stop_str_in_output": honoured(), "skip_special_tokens": honoured(),
    "spaces_between_special_tokens": accepted(bool),  # fast tokenizers ignore it, as in vLLM
    "truncate_prompt_tokens": honoured(), "allowed_token_ids": honoured(),
    "bad_words": honoured(), "prompt_logprobs": honoured(),
    "use_beam_search": refused("beam search", false_or_unset),
    "length_penalty": refused("length_penalty (beam search only)", one),
    # vLLM's other extras
    "add_special_tokens": honoured(), "return_tokens_as_token_ids": honoured(),
    "structured_outputs": honoured(), "request_id": accepted(str),
    "add_generation_prompt": honoured(CHAT), "continue_final_message": honoured(CHAT),
    "chat_template_kwargs": honoured(CHAT),
    "include_reasoning": honoured(CHAT),  # with --reasoning-parser: false drops the thinking
    "mm_processor_kwargs": accepted(dict, CHAT), "media_io_kwargs": accepted(dict, CHAT),
    "chat_template": refused("per-request chat templates (start the server with "
                             "--chat-template)", endpoints=CHAT),
    "documents": refused("documents for the chat template", endpoints=CHAT),
    "priority": refused("priority scheduling (requests are served first come, first served)",
                        zero),
    "cache_salt": refused("prefix-cache salting"),
    "return_token_ids": refused("return_token_ids", false_or_unset),
    "logits_processors": refused("custom logits processors"),
    "kv_transfer_params": refused("KV cache transfer"),
    "vllm_xargs": refused("vllm_xargs"),
    "prompt_embeds": refused("prompt embeddings", endpoints=COMPLETION),
}


def check_fields(body: dict, endpoint: str, table: dict[str, Policy] | None = None) -> None:
    """Raises a 400 naming the first field of `body` (a request to `endpoint`, "chat" or
    "completion", or the endpoint of another `table`) that is unknown there, of the wrong type,
    or asks what the server cannot do."""
    for name, value in body.items():
        policy = (FIELDS if table is None else table).get(name)
        if policy is None or endpoint not in policy.endpoints:
            raise invalid(name, f"Unrecognized request argument supplied: {name}")
        if policy.rule == ACCEPTED and value is not None and not is_kind(value, policy.kind):
            raise invalid(name, f"'{name}' must be {type_name(policy.kind())}, got "
                          f"{type_name(value)}.")
        if policy.rule == REFUSED and not policy.can_do(value):
            raise invalid(name, refusal(name, policy))


def check_keys(value: dict, where: str, known) -> None:
    """Raises a 400 naming `where.key` for the first key of the nested object `value` (the body's
    field `where`) that is not among `known`: nested fields are honoured or refused by name too."""
    for key in value:
        if key not in known:
            raise invalid(f"{where}.{key}", f"Unrecognized request argument supplied: {where}.{key}")


def refusal(name: str, policy: Policy) -> str:
    if policy.use:
        return (f"'{name}' is the deprecated form of '{policy.use}', which this server takes: "
                f"send '{policy.use}' instead.")
    return f"'{name}' is not supported: this server does not do {policy.why}."


def is_kind(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
