"""bench's client: a request that a server drops before answering is sent once more (a kept-alive
connection closed while idle); a stream that breaks after its first token is not."""
import asyncio

import httpx

from pagedserve.entrypoints.bench.client import send
from pagedserve.entrypoints.bench.datasets import BenchRequest

REQUEST = BenchRequest(prompt=[1, 2, 3], prompt_len=3, output_len=2)
STREAM = (b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\n'
          b'data: {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 3}}\n\ndata: [DONE]\n\n')


class BrokenAfterFirstToken(httpx.AsyncByteStream):
    async def __aiter__(self):
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        raise httpx.RemoteProtocolError("peer closed connection")


def run_send(answers: list) -> tuple:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(200, stream=answer) if isinstance(answer, httpx.AsyncByteStream) \
            else httpx.Response(200, content=answer)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send(client, "http://server/v1/completions", "m", REQUEST)
    return asyncio.run(go()), len(calls)


def test_a_request_dropped_before_any_answer_is_sent_again():
    out, calls = run_send([httpx.RemoteProtocolError("Server disconnected without sending a response."), STREAM])
    assert calls == 2
    assert out.success and out.output_tokens == 2 and not out.error and len(out.itl) == 1


def test_a_request_dropped_twice_fails_with_the_error():
    out, calls = run_send([httpx.RemoteProtocolError("Server disconnected without sending a response.")])
    assert calls == 2
    assert not out.success and out.error.startswith("RemoteProtocolError")


def test_a_stream_broken_after_its_first_token_is_not_sent_again():
    out, calls = run_send([BrokenAfterFirstToken(), STREAM])
    assert calls == 1
    assert not out.success and out.error.startswith("RemoteProtocolError") and out.ttft > 0
