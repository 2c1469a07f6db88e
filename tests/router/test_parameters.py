"""Every request field reaches the scheduler as the scheduler's SamplingParams, takes effect in
the router, or is refused by name (router/field_policy.py), over real HTTP with the `openai` SDK."""

import asyncio
import time

import grpc
import httpx
import pytest

from pagedserve.router.client import SchedulerClient
from pagedserve.router.errors import APIError
from pagedserve.router.generation import Generation, start_generation
from pagedserve.router.logs import NO_REQUEST, current_request_id
from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers.router_fixtures import EOS, chat, ids_of, say, streamed_text

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
