"""A streamed /v1/completions request read as a client reads it: the text, the token strings (with
logprobs on), the final usage, and every error event, over plain httpx."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx


@dataclass
class Streamed:
    text: str = ""
    tokens: list[str] = field(default_factory=list)  # logprobs.tokens, where asked for
    completion_tokens: int | None = None              # the last usage seen
    errors: list[str] = field(default_factory=list)  # error events' messages


def stream_completion(url: str, body: dict, on_chunk=None, timeout: float = 300) -> Streamed:
    """POSTs `body` (with "stream": true) to url + /v1/completions and reads every event;
    on_chunk(n) is called after the n-th choice chunk. Asserts the reply is a 200."""
    out, chunks, usage = Streamed(), 0, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.errors.append(chunk["error"]["message"])
                continue
            for choice in chunk["choices"]:
                out.text += choice["text"]
                out.tokens += (choice.get("logprobs") or {}).get("tokens") or []
                chunks += 1
                if on_chunk is not None:
                    on_chunk(chunks)
            usage = chunk.get("usage") or usage
    out.completion_tokens = (usage or {}).get("completion_tokens")
    return out
