"""The Responses API and the reasoning parser through real processes and the real openai SDK.

SmolLM2 (the shared `smol_stack`): a Responses reply is the chat reply to the same conversation
(greedy: the same text), streamed or not, continued with `previous_response_id` or written out in
full; `text.format` json_schema validates; a function tool round trip; GET and DELETE.

A tiny random Qwen3 checkpoint served with `--reasoning-parser qwen3` and a Qwen3-style chat
template: a regex steers its output into `<think>...</think>` followed by an answer; the raw text
(the same prompt as a completion, greedy, same constraint) is split into the thinking and the
answer in chat (plain and streamed) and in the Responses API's reasoning item; with
`"enable_thinking": false` the template closes the block in the prompt and the text is all answer.
"""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.helpers import tiny_models
from tests.helpers.stack import run_stack

MODEL = "SmolLM2-135M-Instruct"
POINT = {"type": "object", "additionalProperties": False, "required": ["x", "y"],
         "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                        "y": {"type": "integer", "minimum": 0, "maximum": 9}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]}}}}
# A Qwen3 thinking template in small: the generation prompt opens the thinking (as Qwen3's
# thinking checkpoints' do), or closes an empty block at once with enable_thinking false (as
# Qwen3's hybrid template does).
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")
STEER = r"<think>[a-z]{2,10}</think>[a-z]{2,10}"


@pytest.fixture(scope="module")
def smol(smol_stack) -> OpenAI:
    return OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=600)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_text(client: OpenAI, messages: list[dict], **kw) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=24, **kw).choices[0].message.content


def test_a_reply_is_the_chat_reply_plain_and_streamed(smol):
    r = smol.responses.create(model=MODEL, input="Name a colour.", instructions="Be brief.",
                              temperature=0, max_output_tokens=24)
    expected = chat_text(smol, [{"role": "system", "content": "Be brief."},
                                *ask("Name a colour.")])
    assert r.output_text == expected and r.usage.output_tokens > 0
    with smol.responses.stream(model=MODEL, input="Name a colour.", instructions="Be brief.",
                               temperature=0, max_output_tokens=24) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == expected
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_previous_response_id_is_the_whole_conversation(smol, smol_stack):
    first = smol.responses.create(model=MODEL, input="Name a fruit.", temperature=0,
                                  max_output_tokens=16)
    second = smol.responses.create(model=MODEL, input="And a vegetable?", temperature=0,
                                   max_output_tokens=16, previous_response_id=first.id)
    assert second.output_text == chat_text(
        smol, [*ask("Name a fruit."), {"role": "assistant", "content": first.output_text},
               *ask("And a vegetable?")], max_completion_tokens=16)
    got = smol.responses.retrieve(second.id)
    assert got.output_text == second.output_text and got.previous_response_id == first.id
    smol.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        smol.responses.retrieve(first.id)
    assert smol_stack.wait_idle().kv_blocks_used == 0


def test_text_format_json_schema_validates(smol):
    r = smol.responses.create(model=MODEL, input="A point on a 10 by 10 grid, as JSON.",
                              temperature=0, max_output_tokens=40,
                              text={"format": {"type": "json_schema", "name": "point",
                                               "schema": POINT, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), POINT)


def test_a_function_tool_round_trip(smol):
    first = smol.responses.create(model=MODEL, input="What is the weather in Lyon?",
                                  tools=[WEATHER], tool_choice="required", temperature=0,
                                  max_output_tokens=40)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    second = smol.responses.create(
        model=MODEL, tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=20,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 24 degrees."}])
    assert second.status in ("completed", "incomplete") and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its result


# ----- the reasoning parser on a tiny Qwen3 --------------------------------------------------

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    tiny_models.build("qwen3", path)
    template = path / "template.jinja"
    template.write_text(QWEN3_TEMPLATE)
    with run_stack(path, "--served-model-name", "tiny", "--reasoning-parser", "qwen3",
                   "--chat-template", str(template), "--max-model-len", "256",
                   log_dir=tmp_path_factory.mktemp("qwen3-stack")) as stack:
        yield stack


def raw_text(stack, messages: list[dict], steer: bool = True, max_tokens: int = 40,
             **template) -> str:
    """The model's own text for this chat: its prompt as a completion, greedy (steered)."""
    prompt = httpx.post(f"{stack.root_url}/tokenize", timeout=60, json={
        "model": "tiny", "messages": messages, "chat_template_kwargs": template}).json()["tokens"]
    client = OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=600)
    extra = {"structured_outputs": {"regex": STEER}} if steer else {}
    return client.completions.create(model="tiny", prompt=prompt, temperature=0,
                                     max_tokens=max_tokens, extra_body=extra).choices[0].text


def test_the_thinking_is_split_from_the_answer(qwen3):
    client = OpenAI(base_url=qwen3.base_url, api_key="none", max_retries=0, timeout=600)
    messages = ask("hello")
    raw = raw_text(qwen3, messages)
    thinking, answer = re.fullmatch(r"<think>([a-z]+)</think>([a-z]+)", raw).groups()
    kw = dict(model="tiny", messages=messages, temperature=0, max_tokens=40,
              extra_body={"structured_outputs": {"regex": STEER}})
    message = client.chat.completions.create(**kw).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (thinking, answer)
    assert message.model_extra["reasoning"] == thinking
    deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw)
              if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == answer


def test_the_responses_api_returns_the_thinking_as_a_reasoning_item(qwen3):
    """Unsteered, a random model never closes the block the template opened: all thinking."""
    client = OpenAI(base_url=qwen3.base_url, api_key="none", max_retries=0, timeout=600)
    raw = raw_text(qwen3, ask("hello"), steer=False, max_tokens=12)
    assert raw and "</think>" not in raw
    r = client.responses.create(model="tiny", input="hello", temperature=0, max_output_tokens=12)
    assert [o.type for o in r.output] == ["reasoning"]
    assert r.output[0].content[0].text == raw and r.output_text == ""
    events = list(client.responses.create(model="tiny", input="hello", temperature=0,
                                          max_output_tokens=12, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == raw


def test_enable_thinking_false_leaves_the_text_whole(qwen3):
    client = OpenAI(base_url=qwen3.base_url, api_key="none", max_retries=0, timeout=600)
    messages = ask("hello")
    raw = raw_text(qwen3, messages, enable_thinking=False)
    message = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=40,
        extra_body={"structured_outputs": {"regex": STEER},
                    "chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert message.content == raw and message.model_extra["reasoning_content"] is None
