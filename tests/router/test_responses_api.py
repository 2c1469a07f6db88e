"""OpenAI's Responses API through the real openai SDK against the router (the fake scheduler writes
the text): plain and streamed replies (the raw typed events and the SDK's `responses.stream`),
function tools in a round trip, reasoning items, `text.format`, the store (`previous_response_id`,
GET, DELETE, eviction) and the fields refused by name."""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from tests.helpers.router_fixtures import say

ADD = {"type": "function", "name": "add", "description": "Adds two integers",
       "parameters": {"type": "object", "required": ["a", "b"],
                      "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'


@pytest.fixture(scope="module")
def router(harness):
    return harness.router(enable_auto_tool_choice=True, tool_call_parser="hermes",
                          reasoning_parser="qwen3", max_stored_responses=3)


@pytest.fixture
def api(router, fake) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=20)


def prompt_text(fake, tokenizer) -> str:
    return tokenizer.decode(list(fake.requests[-1].prompt_token_ids), skip_special_tokens=False)


def test_a_plain_reply_is_one_message_with_usage(api, fake, tokenizer):
    ids = say(fake, tokenizer, "Hello there.")
    r = api.responses.create(model="smol", input="Hi", instructions="Be brief.",
                             max_output_tokens=40, temperature=0.5, top_p=0.9)
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == "Hello there." and [o.type for o in r.output] == ["message"]
    prompt = list(fake.requests[-1].prompt_token_ids)
    assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == len(ids) + 1  # EOS
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    params = fake.last_params
    assert params.max_tokens == 40 and params.temperature == 0.5 and abs(params.top_p - 0.9) < 1e-6
    assert (r.instructions, r.max_output_tokens, r.temperature) == ("Be brief.", 40, 0.5)


def test_input_items_render_as_the_same_chat(api, client, fake, tokenizer):
    say(fake, tokenizer, "ok")
    api.responses.create(model="smol", instructions="Sys.", input=[
        {"role": "user", "content": "a"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "b", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "c"}]}])
    responses_prompt = list(fake.requests[-1].prompt_token_ids)
    client.chat.completions.create(model="smol", messages=[
        {"role": "system", "content": "Sys."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert list(fake.requests[-1].prompt_token_ids) == responses_prompt


def test_max_output_tokens_makes_an_incomplete_reply(api, fake, tokenizer):
    say(fake, tokenizer, "one two three four five six")
    r = api.responses.create(model="smol", input="Hi", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"


def test_streamed_events_in_order_reassemble_to_the_reply(api, fake, tokenizer):
    say(fake, tokenizer, "<think>Hmm.</think>Hello there, friend.")
    events = list(api.responses.create(model="smol", input="Hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    reasoning_done = kinds.index("response.output_item.done")
    assert kinds[3:reasoning_done] == ["response.reasoning_text.delta"] * (reasoning_done - 4) + \
        ["response.reasoning_text.done"]
    rest = kinds[reasoning_done + 1:]
    assert rest[:2] == ["response.output_item.added", "response.content_part.added"]
    assert rest[-5:] == ["response.output_text.delta", "response.output_text.done",
                         "response.content_part.done", "response.output_item.done",
                         "response.completed"]
    assert set(rest[2:-4]) == {"response.output_text.delta"}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello there, friend." == events[-1].response.output_text
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Hmm." and final.usage.output_tokens > 0
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    # the plain reply is the same response
    plain = api.responses.create(model="smol", input="Hi")
    assert [o.type for o in plain.output] == ["reasoning", "message"]
    assert plain.output_text == text and plain.output[0].content[0].text == "Hmm."


def test_the_sdk_stream_helper_gets_the_final_response(api, fake, tokenizer):
    say(fake, tokenizer, "Streaming works.")
    with api.responses.stream(model="smol", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Streaming works."


def test_a_function_tool_round_trip(api, fake, tokenizer):
    say(fake, tokenizer, CALL)
    first = api.responses.create(model="smol", input="What is 1 + 2?", tools=[ADD])
    [call] = first.output
    assert call.type == "function_call" and call.name == "add"
    assert json.loads(call.arguments) == {"a": 1, "b": 2}
    assert "Adds two integers" in prompt_text(fake, tokenizer)  # the tools reached the prompt
    # streamed: the arguments come in their own events
    events = list(api.responses.create(model="smol", input="What is 1 + 2?", tools=[ADD],
                                       stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"a": 1, "b": 2}]
    assert "".join(e.delta for e in events if e.type ==
                   "response.function_call_arguments.delta") == done[0].arguments
    # the result goes back with the call, and the model answers
    say(fake, tokenizer, "It is 3.")
    second = api.responses.create(model="smol", tools=[ADD], input=[
        {"role": "user", "content": "What is 1 + 2?"},
        {"type": "function_call", "call_id": call.call_id, "name": "add",
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "3"}])
    assert second.output_text == "It is 3."
    prompt = prompt_text(fake, tokenizer)
    # SmolLM2's template drops tool calls: the call is written in the parser's format
    assert prompt.index("What is 1 + 2?") < prompt.index('<tool_call>\n{"name": "add"') < \
        prompt.rindex("3")


def test_tool_choice_required_and_named_are_constrained(api, fake, tokenizer):
    say(fake, tokenizer, '{"a": 4, "b": 5}')
    r = api.responses.create(model="smol", input="4+5", tools=[ADD],
                             tool_choice={"type": "function", "name": "add"})
    assert json.loads(fake.last_params.structured_outputs.json) == ADD["parameters"]
    assert r.output[0].type == "function_call" and json.loads(r.output[0].arguments) == \
        {"a": 4, "b": 5}


class Point(BaseModel):
    x: int
    y: int


def test_text_format_json_schema_is_the_constraint(api, fake, tokenizer):
    say(fake, tokenizer, '{"x": 1, "y": 2}')
    r = api.responses.parse(model="smol", input="A point", text_format=Point)
    assert r.output_parsed == Point(x=1, y=2)
    sent = json.loads(fake.last_params.structured_outputs.json)
    assert sent["properties"] == Point.model_json_schema()["properties"]
    api.responses.create(model="smol", input="json", text={"format": {"type": "json_object"}})
    assert fake.last_params.structured_outputs.json_object


def test_previous_response_id_continues_the_conversation(api, fake, tokenizer):
    say(fake, tokenizer, "Paris is nice.")
    first = api.responses.create(model="smol", input="Tell me about Paris.",
                                 instructions="Old rules.")
    say(fake, tokenizer, "Lyon too.")
    second = api.responses.create(model="smol", input="And Lyon?", instructions="New rules.",
                                  previous_response_id=first.id)
    prompt = prompt_text(fake, tokenizer)
    assert prompt.index("Tell me about Paris.") < prompt.index("Paris is nice.") < \
        prompt.index("And Lyon?")
    assert "New rules." in prompt and "Old rules." not in prompt  # instructions do not carry over
    assert second.previous_response_id == first.id
    say(fake, tokenizer, "Both.")
    api.responses.create(model="smol", input="Which?", previous_response_id=second.id)
    prompt = prompt_text(fake, tokenizer)
    assert prompt.index("Paris is nice.") < prompt.index("Lyon too.") < prompt.index("Which?")


def test_get_delete_store_false_and_eviction(api, fake, tokenizer):
    say(fake, tokenizer, "Kept.")
    kept = api.responses.create(model="smol", input="a")
    got = api.responses.retrieve(kept.id)
    assert got.id == kept.id and got.output_text == "Kept." and got.usage == kept.usage
    api.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.delete(kept.id)
    unstored = api.responses.create(model="smol", input="a", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as err:
        api.responses.create(model="smol", input="b", previous_response_id=unstored.id)
    assert err.value.body["param"] == "previous_response_id"
    # --max-stored-responses 3: the least recently used goes first
    ids = [api.responses.create(model="smol", input=str(i)).id for i in range(3)]
    api.responses.retrieve(ids[0])  # used: now the most recent
    api.responses.create(model="smol", input="3")
    api.responses.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(ids[1])


@pytest.mark.parametrize("kw, param", [
    ({"background": True}, "background"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{**ADD, "extra": 1}]}, "tools[0].extra"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "user", "content": "a", "colour": "red"}]}, "input[0].colour"),
    ({"input": [{"role": "robot", "content": "a"}]}, "input"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "extra": 1}}},
     "text.format.extra"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": []}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"stream": True, "stream_options": {"include_usage": True}}, "stream_options.include_usage"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
])
def test_what_is_not_served_is_refused_by_name(api, kw, param):
    with pytest.raises(openai.APIStatusError) as err:  # the body as written, SDK types aside
        api.responses.create(model="smol", input=kw.pop("input", "Hi"), extra_body=kw)
    assert err.value.status_code in (400, 404) and err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error"


def test_a_chat_error_names_this_endpoints_field(api):
    with pytest.raises(openai.BadRequestError) as err:
        api.responses.create(model="smol", instructions="x",
                             input=[{"role": "robot", "content": "a"}])
    assert err.value.body["param"] == "input"
    assert err.value.body["message"].startswith("'input.role' must be one of")


def test_accepted_fields_change_nothing(api, fake, tokenizer):
    say(fake, tokenizer, "Same.")
    r = api.responses.create(model="smol", input="Hi", user="u", safety_identifier="s",
                             service_tier="auto", prompt_cache_key="k", truncation="disabled",
                             include=[], background=False, metadata={"k": "v"},
                             stream=True, stream_options={"include_obfuscation": False})
    final = list(r)[-1].response
    assert final.output_text == "Same." and final.metadata == {"k": "v"}
