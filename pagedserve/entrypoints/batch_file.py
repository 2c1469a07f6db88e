"""OpenAI's batch file format: request lines in, result lines out, and what a rerun skips.

    in:  {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    out: {"id": "batch_req_...", "custom_id": "a",
          "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A request the server refuses (a bad body) is a result like any other: its response carries the
status and the API's error body, as in OpenAI's batches. A line that cannot even be sent (not JSON,
no custom_id, a url this server does not serve) gets a result line of its own whose `error` names a
code, a message and the line, the fields of OpenAI's batch errors.

Resuming: a result stands for its custom_id, and a line's error for its line number (such a line may
have no custom_id, or repeat one), so a rerun sends only what has no result yet.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

URLS = ("/v1/chat/completions", "/v1/completions")

Key = tuple[str, object]  # ("id", custom_id) or ("line", line number)


@dataclass
class BatchRequest:
    line: int
    custom_id: str
    url: str
    body: dict

    @property
    def key(self) -> Key:
        return ("id", self.custom_id)


class BadLine(Exception):
    def __init__(self, line: int, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.line = line
        self.code = code
        self.message = message
        self.custom_id = custom_id

    @property
    def key(self) -> Key:
        return ("line", self.line)

    def record(self) -> dict:
        return {"id": record_id(), "custom_id": self.custom_id, "response": None,
                "error": {"code": self.code, "message": self.message, "line": self.line}}


@dataclass
class Plan:
    requests: list[BatchRequest] = field(default_factory=list)  # to send
    rejected: list[BadLine] = field(default_factory=list)        # error lines to write
    skipped: int = 0                                              # results already in the output


def record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_record(request: BatchRequest, status_code: int, request_id: str | None,
                    body: object) -> dict:
    return {"id": record_id(), "custom_id": request.custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None}


def parse_line(number: int, text: str, seen: set[str]) -> BatchRequest:
    """One input line as a request to send; BadLine says why it cannot be sent."""
    try:
        line = json.loads(text)
    except ValueError as exc:
        raise BadLine(number, "invalid_json", f"Line {number} is not valid JSON: {exc}.") from None
    if not isinstance(line, dict):
        raise BadLine(number, "invalid_json", f"Line {number} must be a JSON object.")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(number, "missing_custom_id",
                      f"Line {number} needs 'custom_id', a non-empty string naming the request.")
    if custom_id in seen:
        raise BadLine(number, "duplicate_custom_id", f"Line {number} repeats custom_id "
                      f"{custom_id!r} of an earlier line; each request needs its own.", custom_id)
    if line.get("method", "POST") != "POST":
        raise BadLine(number, "invalid_method", f"Line {number}: 'method' must be \"POST\".",
                      custom_id)
    if line.get("url") not in URLS:
        raise BadLine(number, "invalid_url", f"Line {number}: 'url' must be one of "
                      f"{', '.join(URLS)}; got {line.get('url')!r}.", custom_id)
    body = line.get("body")
    if not isinstance(body, dict):
        raise BadLine(number, "invalid_body", f"Line {number}: 'body' must be a JSON object.",
                      custom_id)
    if body.get("stream"):
        raise BadLine(number, "invalid_body", f"Line {number}: 'body.stream' must be false: a "
                      "batch result is one whole response.", custom_id)
    seen.add(custom_id)
    return BatchRequest(number, custom_id, line["url"], body)


def plan_batch(input_path: Path, done: set[Key]) -> Plan:
    plan, seen = Plan(), set()
    with open(input_path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                request = parse_line(number, text, seen)
            except BadLine as bad:
                if bad.key in done:
                    plan.skipped += 1
                else:
                    plan.rejected.append(bad)
                continue
            if request.key in done:
                plan.skipped += 1
            else:
                plan.requests.append(request)
    return plan


def result_key(record: dict) -> Key:
    error = record.get("error")
    if isinstance(error, dict) and "line" in error:
        return ("line", error["line"])
    return ("id", record["custom_id"])


def finished_keys(output_path: Path) -> set[Key]:
    """What the output file already holds. A last line without its newline was torn by a kill in
    the middle of a write: it is cut off, and its request runs again."""
    if not output_path.exists():
        return set()
    data = output_path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        with open(output_path, "r+b") as f:
            f.truncate(whole)
    keys = set()
    for number, text in enumerate(data[:whole].decode("utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            keys.add(result_key(json.loads(text)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SystemExit(f"pagedserve run-batch: {output_path} line {number} is not a result "
                             "of run-batch; give another --output-file.") from None
    return keys


def write_record(sink, record: dict) -> None:
    """One result line, flushed at once: a kill loses at most the line being written."""
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()
