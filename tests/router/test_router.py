"""The router over real HTTP, with the real `openai` SDK, in front of a fake scheduler (so no
model runs): shapes, parameters, streaming, stop strings, UTF-8, errors, disconnects."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
from tokenizers import Tokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.client import SchedulerClient
from pagedserve.router.errors import APIError
from pagedserve.router.generation import Generation, start_generation
from pagedserve.router.logs import NO_REQUEST, current_request_id
from tests.helpers.router_fixtures import Harness, free_port

EOS = 2  # <|im_end|>
IM_START = 1


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def harness(model_dir, tokenizer):
    h = Harness(str(model_dir), tokenizer.get_vocab_size(), [EOS])
    h.router()
    yield h
    h.close()


@pytest.fixture
def fake(harness):
    harness.fake.reset()
    return harness.fake


@pytest.fixture
def url(harness) -> str:
    return harness.routers[0].url


@pytest.fixture
def client(url, fake) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def say(fake, tokenizer, text: str) -> list[int]:
    """Makes the fake "model" write `text` (then EOS), whatever the prompt."""
    ids = ids_of(tokenizer, text)
    fake.script = lambda prompt, params, index: ids
    return ids


def chat(client, stream=False, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    kw.setdefault("model", "smol")
    return client.chat.completions.create(stream=stream, **kw)


def streamed_text(chunks, kind="chat") -> tuple[dict[int, str], dict[int, str], list]:
    texts, reasons, rest = {}, {}, []
    for c in chunks:
        if not c.choices:
            rest.append(c)
        for ch in c.choices:
            piece = (ch.delta.content or "") if kind == "chat" else ch.text
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, rest


def eventually(check, timeout=60.0):
    """Waits until check() holds; the timeout is generous (the machine may be busy), and a
    check that holds returns at once."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ----- basics ------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]  # the scheduler's served_model_name
    assert client.models.retrieve("smol").id == "smol"


def test_version_health_and_metrics(url, fake):
    assert httpx.get(url + "/version").json()["version"]
    assert httpx.get(url + "/health").status_code == 200
    fake.healthy = False
    assert httpx.get(url + "/health").status_code == 503
    assert "pagedserve_router_http_requests_total" in httpx.get(url + "/metrics").text


def test_chat_stream_and_non_stream_agree(client, fake, tokenizer):
    text = "Hello there! General Kenobi."
    ids = say(fake, tokenizer, text)
    whole = chat(client, max_tokens=50)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == "stop"
    prompt_len = len(fake.requests[-1].prompt_token_ids)
    assert whole.usage.prompt_tokens == prompt_len
    assert whole.usage.completion_tokens == len(ids) + 1  # EOS counts, though it is not shown
    assert whole.usage.total_tokens == prompt_len + len(ids) + 1

    chunks = list(chat(client, stream=True, max_tokens=50, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    texts, reasons, rest = streamed_text(chunks)
    assert texts == {0: text} and reasons == {0: "stop"}
    assert len(rest) == 1 and rest[0].usage.model_dump() == whole.usage.model_dump()


def test_completion_stream_and_non_stream_agree(client, fake, tokenizer):
    text = " a story about dragons"
    ids = say(fake, tokenizer, text)
    whole = client.completions.create(model="smol", prompt="Tell me", max_tokens=50)
    assert whole.object == "text_completion"
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, "stop")
    assert whole.usage.prompt_tokens == len(ids_of(tokenizer, "Tell me"))
    assert whole.usage.completion_tokens == len(ids) + 1
    chunks = list(client.completions.create(model="smol", prompt="Tell me", max_tokens=50,
                                            stream=True, stream_options={"include_usage": True}))
    texts, reasons, rest = streamed_text(chunks, "completion")
    assert texts == {0: text} and reasons == {0: "stop"}
    assert rest[0].usage.model_dump() == whole.usage.model_dump()


def test_max_tokens_ends_with_length(client, fake, tokenizer):
    ids = say(fake, tokenizer, "one two three four five six")
    out = client.completions.create(model="smol", prompt="Count", max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == tokenizer.decode(ids[:3])
    assert out.usage.completion_tokens == 3


def test_completion_defaults_to_16_tokens_and_echo(client, fake):
    out = client.completions.create(model="smol", prompt="Echo me", echo=True)
    assert fake.last_params.max_tokens == 16
    assert out.choices[0].text.startswith("Echo me") and len(out.choices[0].text) > 7
    texts, _, _ = streamed_text(client.completions.create(
        model="smol", prompt="Echo me", echo=True, stream=True), "completion")
    assert texts == {0: out.choices[0].text}


# ----- stop strings and UTF-8 ----------------------------------------------------------------------

@pytest.mark.parametrize("tokens_per_message", [1, 3])
def test_stop_string_never_leaks(client, fake, tokenizer, tokens_per_message):
    text, stop = "alpha beta gamma delta epsilon", "ta gam"
    ids = say(fake, tokenizer, text)
    assert not any(stop in tokenizer.decode([t]) for t in ids), "the stop must span tokens"
    fake.tokens_per_message = tokens_per_message
    expected = "alpha be"
    stop_token = next(k for k in range(len(ids)) if stop in tokenizer.decode(ids[:k + 1]))

    chunks = list(client.completions.create(model="smol", prompt="Greek", max_tokens=50,
                                            stop=[stop], stream=True,
                                            stream_options={"include_usage": True}))
    texts, reasons, rest = streamed_text(chunks, "completion")
    assert texts == {0: expected} and reasons == {0: "stop"}
    assert rest[0].usage.completion_tokens == stop_token + 1
    request_id = fake.requests[-1].request_id
    eventually(lambda: request_id in fake.aborts)  # the scheduler is told to stop

    whole = client.completions.create(model="smol", prompt="Greek", max_tokens=50, stop=stop)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.usage.completion_tokens == stop_token + 1


def test_chinese_and_emoji_stream_as_valid_utf8(client, fake, tokenizer, url):
    text = "你好，世界！🎉🤖 Ça va? 👍🏽 终于"
    ids = say(fake, tokenizer, text)
    # The test means something only if some token holds part of a character.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    whole = chat(client, max_tokens=100)
    assert whole.choices[0].message.content == text
    # Raw bytes off the wire: every event must be valid UTF-8 JSON with no replacement character.
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        raw = reply.read()
    events = [json.loads(line[6:]) for line in raw.decode("utf-8").split("\n\n")
              if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_token_ids_and_special_tokens(client, fake, tokenizer):
    before, after = ids_of(tokenizer, "before"), ids_of(tokenizer, " after")
    marker = ids_of(tokenizer, " STOP")[0]
    fake.script = lambda prompt, params, index: [*before, IM_START, *after, marker, *after]
    out = client.completions.create(model="smol", prompt="x", max_tokens=50,
                                    extra_body={"stop_token_ids": [marker]})
    assert out.choices[0].text == "before after"  # special token skipped, stop id hidden
    assert out.choices[0].finish_reason == "stop"
    out = client.completions.create(model="smol", prompt="x", max_tokens=50,
                                    extra_body={"stop_token_ids": [marker],
                                                "skip_special_tokens": False})
    assert out.choices[0].text == "before<|im_start|> after"


def test_ignore_eos_runs_to_max_tokens(client, fake, tokenizer):
    ids = say(fake, tokenizer, "la")
    out = client.completions.create(model="smol", prompt="x", max_tokens=7,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 7
    generated = ((ids + [EOS]) * 7)[:7]  # EOS is special: skipped in the text, still counted
    assert out.choices[0].text == tokenizer.decode(generated, skip_special_tokens=True)


# ----- n, several prompts, logprobs ----------------------------------------------------------------

def test_n_choices(client, fake):
    out = chat(client, n=3, max_tokens=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 3
    assert fake.last_params.n == 3
    assert out.usage.completion_tokens == 15
    texts, reasons, _ = streamed_text(chat(client, stream=True, n=3, max_tokens=5))
    assert texts == {i: c.message.content for i, c in enumerate(out.choices)}
    assert reasons == {0: "length", 1: "length", 2: "length"}


def test_several_prompts_are_indexed_prompt_major(client, fake, tokenizer):
    fake.script = lambda prompt, params, index: ids_of(tokenizer, f" p{len(prompt)}s{index}")
    prompts = ["one", [300, 301, 302]]
    out = client.completions.create(model="smol", prompt=prompts, n=2, max_tokens=20)
    assert [c.text for c in out.choices] == [" p1s0", " p1s1", " p3s0", " p3s1"]
    assert [list(r.prompt_token_ids) for r in fake.requests] == [ids_of(tokenizer, "one"),
                                                                 [300, 301, 302]]
    assert out.usage.prompt_tokens == 4
    texts, _, _ = streamed_text(client.completions.create(
        model="smol", prompt=prompts, n=2, max_tokens=20, stream=True), "completion")
    assert texts == {i: c.text for i, c in enumerate(out.choices)}


def test_completion_logprobs_shape(client, fake, tokenizer):
    ids = say(fake, tokenizer, " alpha beta") + [EOS]  # the EOS the text hides keeps its logprob
    out = client.completions.create(model="smol", prompt="x", max_tokens=10, logprobs=2)
    lp = out.choices[0].logprobs
    assert fake.last_params.logprobs == 2
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs == [-0.25] * len(ids)
    assert all(len(top) == 2 and top[tok] == -0.25 for top, tok in zip(lp.top_logprobs, lp.tokens))
    assert lp.text_offset == [len(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids))]


def test_chat_logprobs_shape(client, fake, tokenizer):
    ids = say(fake, tokenizer, "Hi 🎉")
    out = chat(client, max_tokens=10, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(ids) + 1 and content[-1].token == tokenizer.decode([EOS], skip_special_tokens=False)
    assert b"".join(bytes(c.bytes) for c in content[:-1]).decode() == "Hi 🎉"
    assert all(len(c.top_logprobs) == 3 and c.logprob == -0.25 for c in content)
    assert any(c.token.startswith("bytes:") for c in content)  # a piece of the emoji
    chunks = list(chat(client, stream=True, max_tokens=10, logprobs=True, top_logprobs=3))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.model_dump() for e in streamed] == [c.model_dump() for c in content]


# ----- parameters reach the scheduler ------------------------------------------------------------

def test_sampling_params_reach_the_scheduler(client, fake):
    client.completions.create(
        model="smol", prompt="x", max_tokens=9, temperature=0.7, top_p=0.9, n=2, seed=-1,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"42": 5, "7": -100},
        stop=["zz"], user="someone", logprobs=1,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "ignore_eos": True, "stop_token_ids": [5, 6]})
    p = fake.last_params
    assert p.max_tokens == 9 and p.n == 2 and p.top_k == 40 and p.min_tokens == 2
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)
    assert p.min_p == pytest.approx(0.05) and p.repetition_penalty == pytest.approx(1.1)
    assert p.presence_penalty == 0.5 and p.frequency_penalty == -0.5
    assert p.seed == 2**64 - 1
    assert dict(p.logit_bias) == {42: 5.0, 7: -100.0}
    assert list(p.stop_token_ids) == [5, 6] and p.ignore_eos and p.logprobs == 1


def test_chat_params_and_defaults(client, fake):
    chat(client, max_completion_tokens=11, temperature=0)
    p = fake.last_params
    assert p.max_tokens == 11 and p.HasField("temperature") and p.temperature == 0
    assert not p.HasField("top_p") and not p.HasField("logprobs") and not p.HasField("seed")
    chat(client)  # chat has no default max_tokens: the scheduler fills the context
    assert not fake.last_params.HasField("max_tokens")


def test_chat_content_parts_and_template(client, fake, tokenizer):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    chat(client, messages=[{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": parts}], max_tokens=2)
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello\nworld"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert list(fake.requests[-1].prompt_token_ids) == ids_of(tokenizer, expected)


def test_request_id_is_echoed_and_prefixes_the_scheduler_id(url, fake):
    reply = httpx.post(url + "/v1/completions", headers={"X-Request-Id": "my-req-42"},
                       json={"model": "smol", "prompt": "hi", "max_tokens": 2})
    assert reply.headers["x-request-id"] == "my-req-42"
    assert reply.json()["id"] == "cmpl-my-req-42"
    assert fake.requests[-1].request_id.startswith("my-req-42-")
    assert httpx.get(url + "/v1/models").headers["x-request-id"]  # made up when not given


# ----- tokenize ------------------------------------------------------------------------------------

def test_tokenize_detokenize_roundtrip(url, fake, tokenizer, client):
    text = "Hello 世界 🎉"
    tok = httpx.post(url + "/tokenize", json={"model": "smol", "prompt": text}).json()
    assert tok["tokens"] == ids_of(tokenizer, text) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 2048
    back = httpx.post(url + "/detokenize", json={"model": "smol", "tokens": tok["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": text}]
    counted = httpx.post(url + "/tokenize", json={"messages": messages}).json()["count"]
    assert chat(client, messages=messages, max_tokens=1).usage.prompt_tokens == counted


# ----- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, param", [
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_chat_params_are_400_naming_the_param(client, kw, param):
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol", **kw)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in err.value.body["message"] or "context length" in \
        err.value.body["message"]


@pytest.mark.parametrize("prompt", [[49152], [[1, 2], [-1]], "", [], [1.5]])
def test_invalid_prompts_are_400(client, prompt):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt=prompt, max_tokens=2)
    assert err.value.body["param"] == "prompt"


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt=[300] * 2048, max_tokens=1)
    assert err.value.body["param"] == "prompt"
    assert err.value.body["code"] == "context_length_exceeded"


def test_malformed_json_is_400(url):
    reply = httpx.post(url + "/v1/chat/completions", content=b'{"model": ',
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="gpt-17")
    assert err.value.body["code"] == "model_not_found"
    assert httpx.get(str(client.base_url) + "models/gpt-17").status_code == 404


def test_scheduler_errors_map_to_http(client, fake):
    fake.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full")
    with pytest.raises(openai.InternalServerError) as err:
        chat(client, stream=True)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
    fake.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: too many")
    with pytest.raises(openai.BadRequestError) as err:
        chat(client)
    assert "max_tokens: too many" in err.value.body["message"]
    assert err.value.body["param"] == "max_tokens"


def test_scheduler_down_is_503_then_recovers(harness, client, url):
    harness.stop_scheduler()
    try:
        with pytest.raises(openai.InternalServerError) as err:
            chat(client)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "scheduler_unavailable"
        assert httpx.get(url + "/health").status_code == 503
    finally:
        harness.start_scheduler()
    eventually(lambda: httpx.get(url + "/health").status_code == 200)
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_a_request_in_flight_when_the_scheduler_goes_is_503_then_the_next_reopens(harness, fake,
                                                                                   client, url):
    """The router's one GenerateStream call breaks with the scheduler: the request on it fails as
    its own broken Generate call did (503 scheduler_unavailable), and once the scheduler is back
    the next request opens a new call."""
    fake.token_delay_s = 0.05
    body = {"model": "smol", "prompt": "x", "max_tokens": 500, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
        eventually(lambda: fake.requests)
        harness.stop_scheduler()
        try:
            failed = reply.result(timeout=60)
        finally:
            harness.start_scheduler()
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "scheduler_unavailable"
    fake.token_delay_s = 0.0
    eventually(lambda: httpx.get(url + "/health").status_code == 200)
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_api_key_and_router_flags(harness, fake, tmp_path, tokenizer):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>")
    router = harness.router(api_key="s3cret", chat_template=str(template), max_model_len=64,
                            served_model_name="custom")
    bad = openai.OpenAI(base_url=router.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(router.url + "/health").status_code == 200  # health checks need no key
    good = openai.OpenAI(base_url=router.url + "/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in good.models.list().data] == ["custom"]
    good.chat.completions.create(model="custom", messages=[{"role": "user", "content": "yo"}],
                                 max_tokens=2)
    assert list(fake.requests[-1].prompt_token_ids) == ids_of(tokenizer, "[user] yo\n>")
    assert fake.authorization[-1] == "Bearer s3cret"  # the scheduler takes the same key
    with pytest.raises(openai.BadRequestError) as err:
        good.completions.create(model="custom", prompt=[300] * 60, max_tokens=10)
    assert err.value.body["param"] == "max_tokens"


# ----- disconnects -------------------------------------------------------------------------------

def test_stream_disconnect_aborts_the_request(url, fake):
    fake.token_delay_s = 0.05
    body = {"model": "smol", "prompt": "x", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
    request_id = fake.requests[-1].request_id
    eventually(lambda: request_id in fake.cancelled and request_id in fake.aborts)


def test_non_stream_disconnect_aborts_the_request(url, fake):
    fake.token_delay_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        # The client gives up 2 s into a 25 s generation (500 tokens, 50 ms apart).
        httpx.post(url + "/v1/chat/completions", timeout=httpx.Timeout(60, read=2),
                   json={"model": "smol", "messages": [{"role": "user", "content": "x"}],
                         "max_tokens": 500, "ignore_eos": True})
    # The explicit Abort is sent after the call is cancelled, without waiting: poll for both.
    eventually(lambda: fake.requests and fake.requests[-1].request_id in fake.cancelled
               and fake.requests[-1].request_id in fake.aborts)


# ----- the command line ----------------------------------------------------------------------------

@pytest.mark.stack  # starts a process
def test_cli_waits_for_the_scheduler(harness, model_dir):
    """`python -m pagedserve.router` started before its scheduler: it retries, then serves."""
    from tests.helpers.fake_scheduler import FakeScheduler, FakeSchedulerServer

    scheduler = FakeSchedulerServer(FakeScheduler(vocab_size=49152, eos_token_ids=[EOS],
                                                  model_path=str(model_dir)), port=free_port())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.router", "--scheduler-addr",
                             scheduler.address, "--port", str(port), "--host", "127.0.0.1",
                             "--log-level", "warning"])
    try:
        time.sleep(1.0)
        harness.loop.run(scheduler.start())
        eventually(lambda: proc.poll() is None and ok(f"http://127.0.0.1:{port}/health"), 60)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert models[0]["id"] == model_dir.name  # no name from the scheduler: the dir's
    finally:
        proc.terminate()
        proc.wait(60)
        harness.loop.run(scheduler.stop())


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ----- every field takes effect or is refused by name --------------------------------------------

def post(url, path, body):
    return httpx.post(url + path, json={"model": "smol", **body}, timeout=20)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "foo": 1}, "foo"),
    ("/v1/completions", {"prompt": "x", "messages": []}, "messages"),  # a chat field
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt": "x"},
     "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "store": "yes"},
     "store"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "x", "priority": 3}, "priority"),
    ("/v1/completions", {"prompt": "x", "bad_words": [" "]}, "bad_words"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10 ** 6]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
])
def test_unknown_and_impossible_fields_are_400_naming_them(url, fake, path, body, param):
    before = len(fake.requests)
    reply = post(url, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"]
    if param == "foo":
        assert error["message"] == "Unrecognized request argument supplied: foo"
    assert len(fake.requests) == before  # nothing reached the scheduler


@pytest.mark.parametrize("field, value, current", [
    ("functions", [{"name": "get_weather", "parameters": {"type": "object"}}], "tools"),
    ("function_call", "auto", "tool_choice"),
])
def test_deprecated_function_fields_are_400_naming_their_current_form(url, fake, field, value,
                                                                      current):
    before = len(fake.requests)
    reply = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "x"}], field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", field)
    assert error["message"] == (f"'{field}' is the deprecated form of '{current}', which this "
                                f"server takes: send '{current}' instead.")
    assert len(fake.requests) == before


def test_fields_without_meaning_here_are_accepted(client, fake):
    reply = chat(client, max_tokens=2, store=True, metadata={"k": "v"}, service_tier="auto",
                 user="u", prediction={"type": "content", "content": "x"},
                 extra_body={"safety_identifier": "s", "prompt_cache_key": "c",
                             "modalities": ["text"], "spaces_between_special_tokens": False,
                             "include_reasoning": False, "request_id": "r", "priority": 0,
                             "use_beam_search": False, "length_penalty": 1.0})
    assert reply.choices[0].finish_reason == "length"


def test_include_stop_str_in_output_plain_and_streamed(client, fake, tokenizer):
    say(fake, tokenizer, "ABCDEFGHIJ")
    fake.tokens_per_message = 1
    kw = dict(model="smol", prompt="x", max_tokens=20, stop=["G"])
    assert client.completions.create(**kw).choices[0].text == "ABCDEF"
    extra = {"include_stop_str_in_output": True}
    whole = client.completions.create(**kw, extra_body=extra)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == ("ABCDEFG", "stop")
    texts, reasons, _ = streamed_text(client.completions.create(**kw, extra_body=extra,
                                                                stream=True), "completion")
    assert (texts[0], reasons[0]) == ("ABCDEFG", "stop")
    # a stop string split over tokens is held back, then shown whole
    say(fake, tokenizer, "one <|end|> two")
    texts, _, _ = streamed_text(client.completions.create(
        model="smol", prompt="x", max_tokens=20, stop=["<|end|>"], extra_body=extra,
        stream=True), "completion")
    assert texts[0] == "one <|end|>"


def test_continue_final_message_leaves_the_assistant_turn_open(client, fake, model_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    chat(client, messages=messages, max_tokens=2,
         extra_body={"continue_final_message": True, "add_generation_prompt": False})
    expected = hf.apply_chat_template(messages, continue_final_message=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    sent = list(fake.requests[-1].prompt_token_ids)
    assert sent == list(expected)
    assert hf.decode(sent).endswith("<|im_start|>assistant\nThe capital of France is")
    chat(client, messages=messages, max_tokens=2)  # without it the turn is closed, a new one opens
    assert hf.decode(list(fake.requests[-1].prompt_token_ids)).endswith(
        "The capital of France is<|im_end|>\n<|im_start|>assistant\n")


def test_truncate_prompt_tokens_keeps_the_last_ones(client, fake, tokenizer):
    client.completions.create(model="smol", prompt=list(range(100, 130)), max_tokens=1,
                              extra_body={"truncate_prompt_tokens": 8})
    assert list(fake.requests[-1].prompt_token_ids) == list(range(122, 130))
    reply = chat(client, max_tokens=1, extra_body={"truncate_prompt_tokens": 3})
    assert len(fake.requests[-1].prompt_token_ids) == 3 == reply.usage.prompt_tokens


def test_token_bans_reach_the_scheduler_as_vllm_encodes_them(client, fake, tokenizer):
    client.completions.create(model="smol", prompt="x", max_tokens=1, extra_body={
        "allowed_token_ids": [5, 6, 7], "bad_words": ["Paris", " hello world"]})
    p = fake.last_params
    assert list(p.allowed_token_ids) == [5, 6, 7]
    expected = []
    for word in ["Paris", "hello world"]:
        plain, spaced = ids_of(tokenizer, word), ids_of(tokenizer, " " + word)
        expected.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            expected.append(spaced)
    assert [list(w.token_ids) for w in p.bad_words] == expected
    assert len(expected) == 4  # both words get their with-a-space form too


def test_a_text_cut_inside_an_emoji_ends_on_the_last_whole_character(client, fake, tokenizer, url):
    text = "月亮🌙月亮🌙"
    ids = say(fake, tokenizer, text)
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    expected = tokenizer.decode(ids[:cut]).rstrip("\ufffd")
    whole = client.completions.create(model="smol", prompt="x", max_tokens=cut, logprobs=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert len(whole.choices[0].logprobs.tokens) == cut  # logprobs keep every token
    texts, reasons, _ = streamed_text(chat(client, stream=True, max_tokens=cut))
    assert texts[0] == expected and reasons[0] == "length"


def test_return_tokens_as_token_ids(client, fake, tokenizer):
    ids = say(fake, tokenizer, "Hi 🎉")
    reply = chat(client, max_tokens=len(ids), logprobs=True, top_logprobs=1,
                 extra_body={"return_tokens_as_token_ids": True})
    assert [e.token for e in reply.choices[0].logprobs.content] == [f"token_id:{t}" for t in ids]


def test_request_success_series_exist_at_zero_from_start_up(harness):
    router = harness.router()
    text = httpx.get(router.url + "/metrics").text
    for reason in ("stop", "length", "abort", "error"):
        assert (f'pagedserve:request_success_total{{finished_reason="{reason}",'
                f'model_name="smol"}} 0.0') in text


def test_cors_is_off_by_default_and_answers_preflights_when_on(harness, url):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    off = httpx.options(url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    router = harness.router(allowed_origins=["https://app.example"], allowed_methods=["POST"],
                            allowed_headers=["authorization", "content-type"], api_key="k")
    on = httpx.options(router.url + "/v1/chat/completions", headers=preflight)
    assert on.status_code == 200  # before the API key check: browsers send no key in preflights
    assert on.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in on.headers["access-control-allow-methods"]
    assert "authorization" in on.headers["access-control-allow-headers"].lower()
    other = httpx.options(router.url + "/v1/models", headers={**preflight,
                                                              "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    real = httpx.get(router.url + "/v1/models", headers={"Origin": "https://app.example",
                                                         "Authorization": "Bearer k"})
    assert real.status_code == 200
    assert real.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_flags_travel_from_serve_to_the_router():
    import argparse

    from pagedserve.entrypoints.launcher import Launcher
    from pagedserve.entrypoints.serve_args import add_serve_args
    from pagedserve.router.__main__ import parse_args
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--model", "m", "--allowed-origins", '["https://a.example"]',
                              "--allowed-headers", '["content-type"]', "--allow-credentials"])
    cmd = Launcher(args).router_command()
    routed = parse_args(cmd[cmd.index("pagedserve.router") + 1:])
    assert routed.allowed_origins == ["https://a.example"] and routed.allow_credentials
    assert (routed.allowed_methods, routed.allowed_headers) == (["*"], ["content-type"])
    assert "--allowed-origins" not in Launcher(parser.parse_args(["--model", "m"])).router_command()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--allowed-origins", "https://a.example"])  # not JSON


def test_every_field_of_the_policy_is_documented():
    from pathlib import Path

    from pagedserve.router.field_policy import FIELDS
    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert [name for name in FIELDS if f"`{name}`" not in doc] == []


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_the_policy_knows_every_field_of_the_openai_sdk(endpoint):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    from pagedserve.router.field_policy import FIELDS
    params = chat_create_params if endpoint == "chat" else completion_create_params
    sdk = {*params.CompletionCreateParamsBase.__annotations__, "stream"}
    assert sorted(f for f in sdk if f not in FIELDS or endpoint not in FIELDS[f].endpoints) == []


def test_chat_echo_starts_the_reply_with_the_last_assistant_message(client, fake, tokenizer):
    say(fake, tokenizer, " Paris.")
    messages = [{"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    extra = {"echo": True, "continue_final_message": True, "add_generation_prompt": False}
    whole = chat(client, messages=messages, max_tokens=10, extra_body=extra)
    assert whole.choices[0].message.content == "The capital of France is Paris."
    texts, reasons, _ = streamed_text(chat(client, stream=True, messages=messages, max_tokens=10,
                                           extra_body=extra))
    assert texts[0] == "The capital of France is Paris." and reasons[0] == "stop"
    # echo has nothing to prepend after a user message
    assert chat(client, max_tokens=10, extra_body={"echo": True}).choices[0].message.content == \
        " Paris."


def test_generation_hands_over_queued_messages_without_waiting(harness, fake, tokenizer):
    """Messages the scheduler already sent are taken without awaiting (the router writes them in
    one go), in order; an empty ready() does not end the stream, next() does."""
    ids = say(fake, tokenizer, "one two three four five")

    async def drain() -> tuple[list[int], object]:
        client = SchedulerClient(harness.scheduler.address)
        request = pb.GenerateRequest(request_id="ready", prompt_token_ids=[5, 6],
                                     params=pb.SamplingParams(max_tokens=50))
        generation = await start_generation(client, [request])
        try:
            tokens = list((await generation.next())[1].token_ids)
            deadline = time.monotonic() + 30
            while len(tokens) < len(ids) + 1 and time.monotonic() < deadline:
                event = generation.ready()
                if event is None:
                    await asyncio.sleep(0.01)  # the rest is still on its way
                else:
                    tokens.extend(event[1].token_ids)
            return tokens, await generation.next()
        finally:
            generation.close()
            await client.close()

    tokens, after = harness.loop.run(drain())
    assert tokens == [*ids, EOS] and after is None


def test_the_shared_stream_carries_no_id_of_the_request_that_opened_it(harness):
    """The GenerateStream call serves every request: its reader logs (and delivers) with no
    X-Request-Id, not with the id of whichever request opened it."""
    async def seen_by_the_reader() -> str:
        current_request_id.set("opener")
        client = SchedulerClient(harness.scheduler.address)
        seen: asyncio.Queue = asyncio.Queue()
        try:
            stream = await client.stream()
            stream.start(pb.GenerateRequest(request_id="ctx", prompt_token_ids=[5],
                                            params=pb.SamplingParams(max_tokens=1)),
                         lambda item: seen.put_nowait(current_request_id.get()))
            return await seen.get()
        finally:
            await client.close()

    assert harness.loop.run(seen_by_the_reader()) == NO_REQUEST


def test_an_error_queued_behind_messages_waits_until_they_are_taken():
    """ready() hands over the messages before a scheduler error and leaves the error for next(),
    so the tokens generated before it still reach the client."""
    async def take() -> tuple[list, str]:
        generation = Generation(None, [pb.GenerateRequest(request_id="err")])
        error = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(),
                                     grpc.aio.Metadata(), "worker lost")
        for item in [pb.GenerateResponse(token_ids=[7]), pb.GenerateResponse(token_ids=[8]), error]:
            generation._queue.put_nowait((0, item))
        taken = [await generation.next(), generation.ready(), generation.ready()]
        with pytest.raises(APIError) as raised:
            await generation.next()
        return [e and list(e[1].token_ids) for e in taken], raised.value.message

    taken, message = asyncio.run(take())
    assert taken == [[7], [8], None] and "worker lost" in message
