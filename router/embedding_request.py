"""Reading a POST /v1/embeddings body: every field checked, each input tokenized (OpenAI's
embeddings API, and vLLM's extras `add_special_tokens`, `normalize`).

`input` takes OpenAI's four forms: a string, an array of strings, an array of token ids, an array
of arrays of token ids; at most MAX_INPUTS inputs, none empty, each at most max_model_len tokens
(an embedding's prompt may fill the context: nothing is generated after it). Fields follow the
chat endpoint's policy (router/field_policy.py): honoured, accepted without effect, refused by
name; anything else is a 400 naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.router.errors import APIError, invalid
from pagedserve.router.field_policy import ACCEPTED, REFUSED, Policy, accepted, honoured, is_kind, refusal, refused, zero
from pagedserve.router.fields import Fields, is_int, type_name
from pagedserve.router.model import ServedModel
from pagedserve.router.protocol import check_model
from pagedserve.v1 import scheduler_pb2 as pb

MAX_INPUTS = 2048  # OpenAI's limit on an array of inputs
ENCODING_FORMATS = ("float", "base64")
ENDPOINT = ("embeddings",)

FIELDS: dict[str, Policy] = {
    # OpenAI
    "input": honoured(ENDPOINT), "model": honoured(ENDPOINT), "encoding_format": honoured(ENDPOINT),
    "dimensions": honoured(ENDPOINT), "user": accepted(str, ENDPOINT),
    # vLLM's extras
    "add_special_tokens": honoured(ENDPOINT), "normalize": honoured(ENDPOINT),
    "request_id": accepted(str, ENDPOINT),
    "truncate_prompt_tokens": refused("prompt truncation for embeddings", endpoints=ENDPOINT),
    "priority": refused("priority scheduling (requests are served first come, first served)", zero,
                        ENDPOINT),
    "messages": refused("chat messages as embedding input", endpoints=ENDPOINT),
}


@dataclass
class EmbeddingRequest:
    prompts: list[list[int]]       # token ids, one list per input, in input order
    pooling: pb.PoolingParams      # what the request sets (dimensions, normalize); the scheduler resolves the rest
    encoding_format: str           # "float" or "base64"


def not_served(model: ServedModel) -> APIError:
    """A generation request to a model served for embeddings."""
    return APIError(400, f"The model `{model.name}` is served for embeddings (--runner pooling): it "
                    "does not generate text. Use /v1/embeddings.", "invalid_request_error", "model",
                    "model_not_supported")


def check_fields(body: dict) -> None:
    for name, value in body.items():
        policy = FIELDS.get(name)
        if policy is None:
            raise invalid(name, f"Unrecognized request argument supplied: {name}")
        if policy.rule == ACCEPTED and value is not None and not is_kind(value, policy.kind):
            raise invalid(name, f"'{name}' must be {type_name(policy.kind())}, got {type_name(value)}.")
        if policy.rule == REFUSED and not policy.can_do(value):
            raise invalid(name, refusal(name, policy))


def parse_embedding(body: dict, model: ServedModel) -> EmbeddingRequest:
    """Raises APIError 400 naming the field (`model` for a model not served for embeddings)."""
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.")
    check_fields(body)
    f = Fields(body)
    check_model(f.string("model"), model)
    if model.runner != "pooling":
        raise APIError(400, f"The model `{model.name}` is served for generation, not embeddings "
                       "(serve an embedding model, or this one with --runner pooling).",
                       "invalid_request_error", "model", "model_not_supported")
    encoding = f.string("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise invalid("encoding_format", f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, "
                      f"got {encoding!r}.")
    pooling = pb.PoolingParams()
    if f.given("dimensions"):
        pooling.dimensions = f.integer("dimensions", minimum=1)
    if f.given("normalize"):
        pooling.normalize = f.boolean("normalize", True)
    prompts = tokenize_inputs(f, model, f.boolean("add_special_tokens", True))
    return EmbeddingRequest(prompts, pooling, encoding)


def tokenize_inputs(f: Fields, model: ServedModel, add_special_tokens: bool) -> list[list[int]]:
    if not f.given("input"):
        raise invalid("input", "'input' is required: a string, an array of strings, an array of "
                      "token ids or an array of arrays of token ids.")
    value = f.raw("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(is_int(v) for v in value)):
        value = [value]  # one input
    if not isinstance(value, list) or not value:
        raise invalid("input", "'input' must be a non-empty string or array.")
    if len(value) > MAX_INPUTS:
        raise invalid("input", f"'input' holds {len(value)} inputs; at most {MAX_INPUTS} are allowed.")
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            ids = model.tokenizer.encode(item, add_special_tokens) if item else []
        elif isinstance(item, list) and all(is_int(v) for v in item):
            bad = next((v for v in item if not 0 <= v < model.vocab_size), None)
            if bad is not None:
                raise invalid("input", f"'input[{i}]' holds token id {bad}, outside [0, {model.vocab_size}).")
            ids = item
        else:
            raise invalid("input", f"'input[{i}]' must be a string or an array of token ids, got "
                          f"{type_name(item)}.")
        if not ids:
            raise invalid("input", f"'input[{i}]' is empty: each input needs at least one token.")
        if len(ids) > model.max_model_len:
            raise invalid("input", f"This model's maximum context length is {model.max_model_len} tokens. "
                          f"However, input {i} has {len(ids)} tokens. Please reduce the length of the input.")
        prompts.append(ids)
    return prompts
