"""One completion request against an OpenAI-compatible server. Streamed, it is timed the way vLLM's
`bench serve` times it: TTFT at the first chunk that carries a choice, one inter-token latency per
later chunk, the token count from the final usage chunk. Plain (`"stream": false`), only its
end-to-end latency and its usage are measured: its tokens all arrive at once, so it has no TTFT,
TPOT or inter-token latency."""
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
    streamed: bool = True  # False: a plain request, whose ttft and itl are not measured
    dropped_unanswered: bool = False  # the connection closed before any answer (send() retries it)


def completion_body(model: str, request: BenchRequest, stream: bool = True) -> dict:
    # Greedy with ignore_eos: every system generates exactly output_len tokens.
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": stream}
    return body | {"stream_options": {"include_usage": True}} if stream else body


def sse_event(line: str) -> dict | None:
    """The JSON payload of one server-sent event line; None for blank lines, comments and [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    return None if data == "[DONE]" else json.loads(data)


def take_usage(out: RequestOutput, usage: dict) -> None:
    """The token counts of a response's `usage`: the server's count of the prompt wins."""
    out.output_tokens = usage.get("completion_tokens", 0)
    out.prompt_len = usage.get("prompt_tokens", out.prompt_len)


async def send(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
               stream: bool = True) -> RequestOutput:
    """One request, streamed or plain; a failure is in the output's `error`, never raised.

    A request that a server drops before it answers anything (httpx.RemoteProtocolError with no
    token yet) is sent once more: a kept-alive connection that the server closed while idle (as
    llama-server does between one user's requests) fails the next request that way, through no
    fault of the request."""
    out = await send_once(client, url, model, request, stream)
    if out.dropped_unanswered:
        out = await send_once(client, url, model, request, stream)
    return out


async def send_once(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
                    stream: bool) -> RequestOutput:
    out = RequestOutput(prompt_len=request.prompt_len, streamed=stream)
    start = time.perf_counter()
    try:
        body = completion_body(model, request, stream)
        await (read_stream if stream else read_plain)(client, url, body, out, start)
        if not out.error:
            out.latency = time.perf_counter() - start
            # A stream counts from its first token; a plain response from its usage.
            out.success = out.ttft > 0 if stream else out.output_tokens > 0
            if not out.success:
                out.error = "the stream ended without a single token" if stream else "the response holds no tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
        out.dropped_unanswered = isinstance(e, httpx.RemoteProtocolError) and out.ttft == 0.0
    return out


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, out: RequestOutput, start: float) -> None:
    last = start
    async with client.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            out.error = f"HTTP {reply.status_code}: {(await reply.aread()).decode(errors='replace')[:500]}"
            return
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
                take_usage(out, event["usage"])


async def read_plain(client: httpx.AsyncClient, url: str, body: dict, out: RequestOutput, start: float) -> None:
    reply = await client.post(url, json=body)
    if reply.status_code != 200:
        out.error = f"HTTP {reply.status_code}: {reply.text[:500]}"
        return
    take_usage(out, reply.json().get("usage") or {})
