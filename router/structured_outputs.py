"""The constraint a request puts on its output, from OpenAI's `response_format` or vLLM's
`structured_outputs`, in the scheduler's StructuredOutputParams.

The router checks shapes only (it holds no grammar engine: that would bring torch into it); the
scheduler asks a worker to compile the constraint before queueing the request, and a constraint
that does not compile comes back as INVALID_ARGUMENT, which the router answers with a 400 whose
`param` is the field the constraint came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.errors import invalid
from pagedserve.router.field_policy import check_keys
from pagedserve.router.fields import Fields, type_name

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's StructuredOutputsParams options that change nothing here: xgrammar is the only backend,
# whitespace is always compact, and there is no fallback to fall back to.
IGNORED_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                   "whitespace_pattern", "backend")


@dataclass
class Constraint:
    params: pb.StructuredOutputParams
    param: str  # the request field it came from, for errors


def request_constraint(f: Fields) -> Constraint | None:
    """`response_format` (other than text) or `structured_outputs`; at most one of them."""
    return one_constraint(response_format(f), structured_outputs(f))


def one_constraint(*constraints: Constraint | None) -> Constraint | None:
    given = [c for c in constraints if c is not None]
    if len(given) > 1:
        raise invalid(given[1].param, f"'{given[0].param}' and '{given[1].param}' both "
                      "constrain the output; give only one of them.")
    return given[0] if given else None


def response_format(f: Fields) -> Constraint | None:
    """OpenAI's `response_format`: text, json_object or json_schema ({name, schema, strict})."""
    fmt = f.object("response_format")
    check_keys(fmt, "response_format", ("type", "json_schema"))
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(pb.StructuredOutputParams(json_object=True), "response_format")
    if kind != "json_schema":
        raise invalid("response_format", "'response_format.type' must be 'text', 'json_object' "
                      f"or 'json_schema'; got {kind!r}.")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise invalid("response_format", "'response_format.json_schema' must be an object with "
                      "'name' (a string) and 'schema' (a JSON schema).")
    # strict: the grammar is always enforced; description: only the model's documentation
    check_keys(spec, "response_format.json_schema", ("name", "schema", "strict", "description"))
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise invalid("response_format", "'response_format.json_schema.schema' must be a JSON "
                      f"schema object, got {type_name(schema)}.")
    return Constraint(pb.StructuredOutputParams(json=json.dumps(schema)), "response_format")


def structured_outputs(f: Fields) -> Constraint | None:
    """vLLM's `structured_outputs`: exactly one of json (a schema, as an object or JSON text),
    regex, choice (an array of strings), grammar (EBNF) and json_object (true)."""
    spec = f.object("structured_outputs")
    if not spec:
        return None
    unknown = set(spec) - set(KINDS) - set(IGNORED_OPTIONS)
    if unknown:
        raise invalid("structured_outputs", f"'structured_outputs' does not support "
                      f"{', '.join(sorted(unknown))}; use one of {', '.join(KINDS)}.")
    given = [k for k in KINDS if spec.get(k) not in (None, False)]
    if len(given) != 1:
        raise invalid("structured_outputs", "'structured_outputs' needs exactly one of "
                      f"{', '.join(KINDS)}; got {len(given)}.")
    kind, value = given[0], spec[given[0]]
    return Constraint(constraint_params(kind, value), "structured_outputs")


def constraint_params(kind: str, value: Any) -> pb.StructuredOutputParams:
    where = f"structured_outputs.{kind}"
    if kind == "json":
        if isinstance(value, str):
            return pb.StructuredOutputParams(json=value)
        if not isinstance(value, dict):
            raise invalid("structured_outputs", f"'{where}' must be a JSON schema (an object).")
        return pb.StructuredOutputParams(json=json.dumps(value))
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise invalid("structured_outputs", f"'{where}' must be a non-empty array of "
                          "non-empty strings.")
        return pb.StructuredOutputParams(choice=value)
    if kind == "json_object":
        if value is not True:
            raise invalid("structured_outputs", f"'{where}' must be true.")
        return pb.StructuredOutputParams(json_object=True)
    if not isinstance(value, str) or not value:
        raise invalid("structured_outputs", f"'{where}' must be a non-empty string.")
    return pb.StructuredOutputParams(**{kind: value})
