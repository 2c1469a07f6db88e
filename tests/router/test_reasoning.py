"""Reasoning parsers (router/reasoning_parsers.py): the thinking split from the answer whatever
the pieces the text comes in, and through the router with the real openai SDK (the fake scheduler
writes the text)."""
from __future__ import annotations

import json

import openai
import pytest

from pagedserve.router.output import Delta
from pagedserve.router.reasoning_parsers import reasoning_output
from pagedserve.router.tool_calls import ToolCallOutput, parse_tools
from pagedserve.router.fields import Fields
from tests.helpers.router_fixtures import eventually, ids_of, say

QWEN_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def split(parser: str, text: str, prompt: str = QWEN_PROMPT, size: int = 0,
          constrained: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, content, the streamed pieces) for `text` fed in pieces of `size` characters
    (0: whole)."""
    out = reasoning_output(parser, prompt, constrained)
    pieces = [text[i:i + size] for i in range(0, len(text), size)] if size else [text]
    deltas = [out.process(Delta(p, finish_reason="stop" if i == len(pieces) - 1 else None))
              for i, p in enumerate(pieces)]
    return ("".join(d.reasoning for d in deltas), "".join(d.text for d in deltas),
            [(d.reasoning, d.text) for d in deltas])


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("parser, prompt, text, reasoning, content", [
    ("qwen3", QWEN_PROMPT, "<think>\nLet me see.\n</think>\n\nHello!", "Let me see.\n", "Hello!"),
    ("qwen3", QWEN_PROMPT, "Hello <think>x</think>", "", "Hello <think>x</think>"),
    ("qwen3", QWEN_PROMPT, "<thin", "", "<thin"),  # cut short: never became a tag
    ("qwen3", QWEN_PROMPT + "<think>\n", "a b</think>c", "a b", "c"),  # the template opened it
    # enable_thinking false: Qwen3's template closes an empty block in the prompt
    ("qwen3", QWEN_PROMPT + "<think>\n\n</think>\n\n", "<think>x</think>y", "", "<think>x</think>y"),
    ("deepseek_r1", QWEN_PROMPT + "<think>\n", "so 2.</think>\n\nTwo.", "so 2.", "Two."),
    ("deepseek_r1", QWEN_PROMPT, "<think>so 2.</think>Two.", "so 2.", "Two."),
    ("deepseek_r1", QWEN_PROMPT, "never closed </thi", "never closed </thi", ""),
])
def test_thinking_is_split_from_the_answer_in_any_pieces(parser, prompt, text, reasoning, content,
                                                         size):
    # the same split in every piece size: half a tag is never released as text of either kind
    assert split(parser, text, prompt, size)[:2] == (reasoning, content)


def test_a_constrained_output_thinks_only_where_it_writes_the_tag():
    assert split("deepseek_r1", '{"a": 1}', QWEN_PROMPT + "<think>\n", constrained=True)[:2] == \
        ("", '{"a": 1}')
    assert split("deepseek_r1", "<think>hm</think>[1]", constrained=True)[:2] == ("hm", "[1]")


def test_tool_calls_are_parsed_from_the_answer_alone():
    tools = parse_tools(Fields({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                        "hermes")
    thinking, calls = reasoning_output("qwen3", QWEN_PROMPT), ToolCallOutput(tools)
    text = '<think>maybe <tool_call>{"name": "g"}</tool_call>?</think>' \
           '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    out = calls.process(thinking.process(Delta(text, finish_reason="stop")))
    assert out.reasoning == 'maybe <tool_call>{"name": "g"}</tool_call>?'
    assert [c["function"]["name"] for c in out.tool_calls] == ["f"]
    assert out.finish_reason == "tool_calls" and out.text == ""


@pytest.fixture(scope="module")
def thinking_client(harness):
    router = harness.router(reasoning_parser="qwen3")
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=20)


def test_chat_returns_the_thinking_apart_and_streams_it(thinking_client, fake, tokenizer):
    say(fake, tokenizer, "<think>\nTwo and two.\n</think>\n\nFour.")
    msg = thinking_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "2+2?"}]).choices[0].message
    assert msg.content == "Four."
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == "Two and two.\n"
    chunks = list(thinking_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "2+2?"}], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Four."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == \
        "Two and two.\n"
    # include_reasoning false (vLLM's): the thinking is dropped
    msg = thinking_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "2+2?"}],
        extra_body={"include_reasoning": False}).choices[0].message
    assert msg.content == "Four." and msg.model_extra["reasoning_content"] is None


def test_without_a_parser_the_thinking_stays_in_the_content(client, fake, tokenizer):
    say(fake, tokenizer, "<think>x</think>y")
    msg = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "q"}]).choices[0].message
    assert msg.content == "<think>x</think>y" and "reasoning_content" not in (msg.model_extra or {})


# ----- a constrained reply thinks first, then answers under the constraint (thinking_first.py) ---

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def two_phases(fake, tokenizer, thinking: str, answer: str) -> tuple[list[int], list[int]]:
    """The fake model thinks freely (and goes on after the end tag), and answers when the
    request carries the constraint."""
    think_ids = ids_of(tokenizer, thinking)
    answer_ids = ids_of(tokenizer, answer)
    junk = ids_of(tokenizer, " and more after the tag")
    fake.script = lambda prompt, params, index: (
        answer_ids if params.HasField("structured_outputs") else think_ids + junk)
    return think_ids, answer_ids


@pytest.mark.parametrize("stream", [False, True])
def test_a_constrained_reply_thinks_then_answers_under_the_constraint(thinking_client, fake,
                                                                      tokenizer, stream):
    fake.tokens_per_message = 3  # the end tag may come inside a message, tokens after it
    think_ids, answer_ids = two_phases(fake, tokenizer, "<think>\nHmm, a is 1.\n</think>",
                                       '\n\n{"a": 1}')
    kw = dict(model="smol", messages=[{"role": "user", "content": "a?"}], max_tokens=60,
              response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                      "schema": SCHEMA}})
    if stream:
        chunks = list(thinking_client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        usage = chunks[-1].usage
    else:
        reply = thinking_client.chat.completions.create(**kw)
        reasoning, content = reply.choices[0].message.model_extra["reasoning_content"], \
            reply.choices[0].message.content
        usage = reply.usage
    assert (reasoning, content) == ("Hmm, a is 1.\n", '{"a": 1}')
    thinking, answer = fake.requests[-2:]
    assert not thinking.params.HasField("structured_outputs")
    assert json.loads(answer.params.structured_outputs.json) == SCHEMA
    # the answer's prompt: the prompt, then the thinking up to its end tag (not what followed)
    assert list(answer.prompt_token_ids) == list(thinking.prompt_token_ids) + think_ids
    assert answer.params.max_tokens == 60 - len(think_ids)
    assert usage.completion_tokens == len(think_ids) + len(answer_ids) + 1  # and EOS
    assert usage.prompt_tokens == len(thinking.prompt_token_ids)
    eventually(lambda: thinking.request_id in fake.aborts)


def test_a_model_that_does_not_think_answers_from_the_prompt(thinking_client, fake, tokenizer):
    _, answer_ids = two_phases(fake, tokenizer, "Straight away", '{"a": 2}')
    reply = thinking_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "a?"}],
        response_format={"type": "json_object"})
    message = reply.choices[0].message
    assert message.content == '{"a": 2}' and message.model_extra["reasoning_content"] is None
    thinking, answer = fake.requests[-2:]
    assert list(answer.prompt_token_ids) == list(thinking.prompt_token_ids)
    assert reply.usage.completion_tokens == len(answer_ids) + 1


def test_a_thinking_that_uses_every_token_has_no_answer(thinking_client, fake, tokenizer):
    think_ids, _ = two_phases(fake, tokenizer, "<think>\nLong thought</think>", "{}")
    reply = thinking_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "a?"}], max_tokens=len(think_ids),
        response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.model_extra["reasoning_content"] == "Long thought"
    assert len(fake.requests) == 1  # no answer was asked for


def test_thinking_turned_off_in_the_prompt_constrains_the_whole_reply(harness, fake, tokenizer,
                                                                      tmp_path_factory):
    """A prompt that closed the block cannot think: one request, under the constraint."""
    path = tmp_path_factory.mktemp("template") / "closed.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                    "{% endfor %}<|im_start|>assistant\n<think>\n\n</think>\n\n")
    router = harness.router(reasoning_parser="deepseek_r1", chat_template=str(path))
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=20)
    say(fake, tokenizer, '{"a": 3}')
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "a"}],
                                           response_format={"type": "json_object"})
    assert reply.choices[0].message.content == '{"a": 3}' and len(fake.requests) == 1
    assert fake.last_params.structured_outputs.json_object


def test_required_tools_think_first_and_call_from_the_answer(thinking_client, fake, tokenizer):
    two_phases(fake, tokenizer, "<think>\nAdd them.\n</think>",
               '[{"name": "add", "parameters": {"a": 1, "b": 2}}]')
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    reply = thinking_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "1+2"}], tools=[tool],
        tool_choice="required")
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == "Add them.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("add", {"a": 1, "b": 2})]
    assert reply.choices[0].finish_reason == "tool_calls" and not message.content
    assert fake.requests[-1].params.HasField("structured_outputs")
