"""The router over real HTTP, with the real `openai` SDK, in front of a fake scheduler (so no
model runs): response shapes, streaming, stop strings, UTF-8, n and logprobs, tokenize."""

import json

import httpx
import pytest

from tests.helpers.router_fixtures import (
    EOS,
    IM_START,
    chat,
    eventually,
    ids_of,
    say,
    streamed_text,
)

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
