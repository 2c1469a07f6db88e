"""The Responses API and the reasoning parser through real processes and the real openai SDK.

SmolLM2 (the shared `smol_stack`): a Responses reply is the chat reply to the same conversation
(greedy: the same text), streamed or not, continued with `previous_response_id` or written out in
full; `text.format` json_schema validates; a function tool round trip; GET and DELETE.

A tiny random Qwen3 checkpoint served with `--reasoning-parser qwen3` and a Qwen3-style chat
template that opens the thinking: a logit bias on its `</think>` token steers it to end the
thinking; the raw text (the same prompt as a completion, greedy) is split into the thinking and the
answer in chat (plain and streamed); with a regex, the thinking stays free and the answer is the
constrained continuation of the prompt and the thinking; unsteered, the Responses API returns the
whole text as a reasoning item; with `"enable_thinking": false` the template closes the block in
the prompt and the constrained text is all answer.
"""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

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
STEER = r"<think>[a-z]{1,3}</think>[a-z]{1,3}"  # a whole reply shaped like a thinking one
ANSWER = r"[a-z]{1,6}"
END = tiny_models.VOCAB_SIZE + 1  # the token </think> (and <think> before it)


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
    """The tiny random Qwen3 with `<think>` and `</think>` as tokens of their own (as Qwen3's
    tokenizer has them), so a logit bias can steer the model to end its thinking."""
    path = tmp_path_factory.mktemp("qwen3")
    tiny_models.build("qwen3", path, vocab_size=tiny_models.VOCAB_SIZE + 2)
    tokenizer = AutoTokenizer.from_pretrained(path)  # a copy: the shared one stays as it is
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(path)
    assert tokenizer.convert_tokens_to_ids("</think>") == END
    (path / "template.jinja").write_text(QWEN3_TEMPLATE)
    with run_stack(path, "--served-model-name", "tiny", "--reasoning-parser", "qwen3",
                   "--chat-template", str(path / "template.jinja"), "--max-model-len", "256",
                   log_dir=tmp_path_factory.mktemp("qwen3-stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def tiny(qwen3) -> OpenAI:
    return OpenAI(base_url=qwen3.base_url, api_key="none", max_retries=0, timeout=600)


def prompt_ids(stack, messages: list[dict], **template) -> list[int]:
    return httpx.post(f"{stack.root_url}/tokenize", timeout=60, json={
        "model": "tiny", "messages": messages, "chat_template_kwargs": template}).json()["tokens"]


def completion(client: OpenAI, prompt: list[int], max_tokens: int = 12, **extra):
    """The model's own greedy continuation of `prompt`: (its text, its token ids)."""
    choice = client.completions.create(
        model="tiny", prompt=prompt, temperature=0, max_tokens=max_tokens, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True, **extra}).choices[0]
    return choice.text, [int(t.split(":")[1]) for t in choice.logprobs.tokens]


@pytest.fixture(scope="module")
def steered(qwen3, tiny):
    """The smallest logit bias on `</think>` (of a few) after which the model thinks at least a
    token, then closes the block: (bias, the prompt's ids, the raw text, its token ids)."""
    prompt = prompt_ids(qwen3, ask("hello"))
    for bias in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5):  # its logits are small
        text, ids = completion(tiny, prompt, logit_bias={str(END): bias})
        if END in ids and ids[0] != END and not text.startswith("</think>"):
            return bias, prompt, text, ids
    pytest.fail("no logit bias on </think> made the model end a thinking")


def test_the_thinking_is_split_from_the_answer(tiny, steered):
    bias, _, raw, _ = steered
    thinking, _, answer = raw.partition("</think>")
    kw = dict(model="tiny", messages=ask("hello"), temperature=0, max_tokens=12,
              logit_bias={str(END): bias})
    message = tiny.chat.completions.create(**kw).choices[0].message
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == thinking
    assert message.content == answer.lstrip()
    deltas = [c.choices[0].delta for c in tiny.chat.completions.create(stream=True, **kw)
              if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == answer.lstrip()


def test_a_constraint_holds_the_answer_not_the_thinking(tiny, steered):
    """The thinking is the model's free text; the answer, after it, matches the regex: it is the
    constrained continuation of the prompt and the thinking."""
    bias, prompt, raw, ids = steered
    thinking_ids = ids[:ids.index(END) + 1]
    answer, _ = completion(tiny, prompt + thinking_ids, max_tokens=12 - len(thinking_ids),
                           logit_bias={str(END): bias},
                           structured_outputs={"regex": ANSWER})
    assert re.fullmatch(ANSWER, answer)
    message = tiny.chat.completions.create(
        model="tiny", messages=ask("hello"), temperature=0, max_tokens=12,
        logit_bias={str(END): bias}, extra_body={"structured_outputs": {"regex": ANSWER}}
    ).choices[0].message
    assert message.model_extra["reasoning_content"] == raw.partition("</think>")[0]
    assert message.content == answer


def test_the_responses_api_returns_the_thinking_as_a_reasoning_item(qwen3, tiny):
    """Unsteered, a random model never closes the block the template opened: all thinking."""
    raw, ids = completion(tiny, prompt_ids(qwen3, ask("hello")))
    assert raw and END not in ids
    r = tiny.responses.create(model="tiny", input="hello", temperature=0, max_output_tokens=12)
    assert [o.type for o in r.output] == ["reasoning"]
    assert r.output[0].content[0].text == raw and r.output_text == ""
    events = list(tiny.responses.create(model="tiny", input="hello", temperature=0,
                                        max_output_tokens=12, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == raw


def test_enable_thinking_false_leaves_the_text_whole(qwen3, tiny):
    """The template closed the block in the prompt: no thinking, the constraint holds it all."""
    raw, _ = completion(tiny, prompt_ids(qwen3, ask("hello"), enable_thinking=False),
                        structured_outputs={"regex": STEER})
    message = tiny.chat.completions.create(
        model="tiny", messages=ask("hello"), temperature=0, max_tokens=12,
        extra_body={"structured_outputs": {"regex": STEER},
                    "chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert message.content == raw and message.model_extra["reasoning_content"] is None
