"""One streamed completion request against an OpenAI-compatible server, timed the way vLLM's
`bench serve` times it: TTFT at the first chunk that carries a choice, one inter-token latency per
later chunk, the token count from the final usage chunk."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from .datasets import BenchRequest


@dataclass
class RequestOutput:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between consecutive chunks
    latency: float = 0.0  # end to end, seconds
    error: str = ""


def completion_body(model: str, request: BenchRequest) -> dict:
    # Greedy with ignore_eos: every system generates exactly output_len tokens.
    return {
        "model": model, "prompt": request.prompt, "max_tokens": request.output_len,
        "temperature": 0.0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }


def sse_event(line: str) -> dict | None:
    """The JSON payload of one server-sent event line; None for blank lines, comments and [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    return None if data == "[DONE]" else json.loads(data)


async def send(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest) -> RequestOutput:
    out = RequestOutput(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=completion_body(model, request)) as reply:
            if reply.status_code != 200:
                out.error = f"HTTP {reply.status_code}: {(await reply.aread()).decode(errors='replace')[:500]}"
                return out
            async for line in reply.aiter_lines():
                event = sse_event(line)
                if event is None:
                    continue
                now = time.perf_counter()
                if event.get("choices"):
                    if out.ttft == 0.0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    out.output_tokens = event["usage"].get("completion_tokens", 0)
                    out.prompt_len = event["usage"].get("prompt_tokens", out.prompt_len)
        out.latency = time.perf_counter() - start
        out.success = out.ttft > 0
        if not out.success:
            out.error = "the stream ended without a single token"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out
