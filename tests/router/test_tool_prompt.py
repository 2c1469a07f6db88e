"""Tools reach the model whatever its chat template (router/tool_prompt.py): SmolLM2's template has
no `tools` variable and drops tool calls, so they go into the prompt's text in the parser's format;
a template that renders them gets them as they are."""
from __future__ import annotations

import pytest

from pagedserve.router.prompts import chat_messages, chat_prompt
from pagedserve.router.tokenizer import Tokenizer
from tests.helpers.router_fixtures import chat, say

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}
# A template that renders tools and tool calls itself (in the Hermes style)
WITH_TOOLS = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


@pytest.fixture(scope="module")
def smol(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def hermes_style(model_dir) -> Tokenizer:
    return Tokenizer(model_dir, WITH_TOOLS)


def test_probes_tell_which_templates_render_tools(smol, hermes_style):
    assert not smol.renders_tools and not smol.renders_tool_calls
    assert hermes_style.renders_tools and hermes_style.renders_tool_calls


def test_smollm2_gets_the_tools_in_a_system_message_and_the_calls_as_text(smol):
    text = chat_prompt(chat_messages(HISTORY), smol, tools=[TOOL], tool_parser="hermes").text
    system = text[:text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in system
    assert "<tool_call>" in system  # how to call, in the hermes parser's format
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in text[text.index("<|im_start|>assistant"):]
    # an existing system message keeps its text, the tools after it
    text = chat_prompt(chat_messages([{"role": "system", "content": "Be brief."}, *HISTORY]),
                       smol, tools=[TOOL]).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert text.count("<|im_start|>system") == 1


def test_a_template_that_renders_tools_gets_them_unchanged(hermes_style):
    messages = chat_messages(HISTORY)
    text = chat_prompt(messages, hermes_style, tools=[TOOL], tool_parser="hermes").text
    assert text == hermes_style.render_chat(messages, tools=[TOOL])
    assert "# Tools" not in text and "<call>get_weather</call>" in text


def test_without_tools_the_prompt_is_unchanged(smol):
    messages = chat_messages([{"role": "user", "content": "Hi"}])
    assert chat_prompt(messages, smol).text == smol.render_chat(messages)


def test_chat_tool_choice_required_sends_the_tools_to_the_model(client, fake, tokenizer):
    say(fake, tokenizer, '[{"name": "get_weather", "parameters": {"city": "Paris"}}]')
    reply = chat(client, tools=[TOOL], tool_choice="required")
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    prompt = tokenizer.decode(list(fake.requests[-1].prompt_token_ids), skip_special_tokens=False)
    assert "Weather in a city" in prompt
