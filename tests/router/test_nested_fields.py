"""Fields inside objects follow the field policy too: `stream_options` and `response_format` keys
are honoured or refused by name (a 400 whose `param` is `object.key`), and vLLM's
`stream_options.continuous_usage_stats` puts the usage so far on every streamed chunk."""
from __future__ import annotations

import openai
import pytest

from tests.helpers.router_fixtures import chat, say


@pytest.mark.parametrize("kw, param", [
    ({"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}},
     "stream_options.include_obfuscation"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {}, "strictly": True}}},
     "response_format.json_schema.strictly"),
])
def test_unknown_nested_keys_are_400_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, **kw)
    assert err.value.body["param"] == param
    assert err.value.body["message"] == f"Unrecognized request argument supplied: {param}"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_continuous_usage_stats_counts_on_every_chunk(client, fake, tokenizer, kind):
    ids = say(fake, tokenizer, "one two three four")
    options = {"include_usage": True, "continuous_usage_stats": True}
    if kind == "chat":
        chunks = list(chat(client, stream=True, stream_options=options))
    else:
        chunks = list(client.completions.create(model="smol", prompt="Hi", max_tokens=50,
                                                stream=True, stream_options=options))
    content = [c for c in chunks if c.choices and (c.choices[0].finish_reason or
                                                  getattr(c.choices[0], "text", None) or
                                                  getattr(getattr(c.choices[0], "delta", None),
                                                          "content", None))]
    assert len(content) >= len(ids) and all(c.usage is not None for c in content)
    counts = [c.usage.completion_tokens for c in content]
    assert counts == sorted(counts) and counts[0] >= 1
    prompt = {c.usage.prompt_tokens for c in content}
    last = chunks[-1]  # include_usage's own last chunk, with the totals
    assert not last.choices and prompt == {last.usage.prompt_tokens}
    assert counts[-1] == last.usage.completion_tokens == len(ids) + 1  # and EOS
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
               for c in content)


def test_without_continuous_usage_stats_chunks_carry_none(client, fake, tokenizer):
    say(fake, tokenizer, "one two")
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage is not None
