"""Tool calling in the router, without a server: request checks, the enforcing schema, and each
choice's deltas turned into tool calls (held back while streaming, the same calls either way)."""
import json

import jsonschema
import pytest

from pagedserve.router.errors import APIError
from pagedserve.router.fields import Fields
from pagedserve.router.output import Delta
from pagedserve.router.tool_calls import ToolCallOutput, parse_tools, tool_constraint
from pagedserve.router.tool_parsers import HermesParser

TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "required": ["a", "b"],
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


def tools(parser="hermes", **body):
    return parse_tools(Fields({"tools": [TOOL], **body}), parser)


def run(tools_, pieces, finish="stop") -> list[Delta]:
    """Deltas out for text pieces in, the last one finishing the choice."""
    out = ToolCallOutput(tools_)
    return [out.process(Delta(p, finish_reason=finish if i == len(pieces) - 1 else None))
            for i, p in enumerate(pieces)]


def merged(deltas) -> Delta:
    whole = Delta()
    for d in deltas:
        whole.absorb(d)
    return whole


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "auto"}, "tool_choice"),  # without --tool-call-parser
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_name_the_field(body, param):
    with pytest.raises(APIError) as err:
        tools(parser=None, **body)
    assert err.value.status == 400 and err.value.param == param


def test_a_bad_tool_names_its_index():
    with pytest.raises(APIError) as err:
        parse_tools(Fields({"tools": [TOOL, {"type": "function", "function": {}}]}), None)
    assert err.value.param == "tools[1]"


def test_required_schema_accepts_calls_and_refuses_others():
    schema = json.loads(tool_constraint(tools(tool_choice="required", parallel_tool_calls=False)).params.json)
    jsonschema.validate([{"name": "add", "parameters": {"a": 1, "b": 2}}], schema)
    for bad in ([], [{"name": "sub", "parameters": {"a": 1, "b": 2}}], [{"name": "add", "parameters": {"a": 1}}],
                [{"name": "add", "parameters": {"a": 1, "b": 2}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = tool_constraint(tools(tool_choice={"type": "function", "function": {"name": "add"}}))
    assert json.loads(named.params.json) == TOOL["function"]["parameters"]
    assert tool_constraint(tools(tool_choice="auto")) is None


def test_hermes_calls_are_held_back_while_streaming_and_parsed_at_the_end():
    pieces = ["Sure", ". <tool", '_call>{"name": "add", ', '"arguments": {"a": 1, "b": 2}}</tool_call>']
    deltas = run(tools(tool_choice="auto"), pieces)
    assert [d.text for d in deltas] == ["Sure", ". ", "", ""]
    assert deltas[-1].finish_reason == "tool_calls"
    call = deltas[-1].tool_calls[0]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}


def test_text_that_only_looked_like_a_call_is_released():
    deltas = run(tools(tool_choice="auto"), ["a <tool", "box> and <tool_call>not json</tool_call>"])
    assert merged(deltas).text == "a <toolbox> and <tool_call>not json</tool_call>"
    assert not merged(deltas).tool_calls and deltas[-1].finish_reason == "stop"


def test_required_calls_cut_by_max_tokens_keep_the_complete_ones():
    pieces = ['[{"name": "add", "parameters": {"a": 1, "b": 2}}, ', '{"name": "add", "param']
    deltas = run(tools(tool_choice="required"), pieces, finish="length")
    whole = merged(deltas)
    assert whole.text == "" and whole.finish_reason == "length"
    assert [c["function"]["arguments"] for c in whole.tool_calls] == ['{"a": 1, "b": 2}']


def test_named_call_cut_short_is_text_with_length():
    named = tools(tool_choice={"type": "function", "function": {"name": "add"}})
    whole = merged(run(named, ['{"a": 1, ', '"b'], finish="length"))
    assert whole.text == '{"a": 1, "b' and not whole.tool_calls and whole.finish_reason == "length"
    whole = merged(run(named, ['{"a": 1, ', '"b": 2}']))
    assert whole.tool_calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert whole.finish_reason == "tool_calls"


def test_hermes_parser_keeps_content_before_several_calls():
    end, calls = HermesParser().parse('Hi <tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                                      '<tool_call>{"name": "b", "arguments": {"x": [1]}}</tool_call>')
    assert end == 3 and [(c.name, c.arguments) for c in calls] == [("a", "{}"), ("b", '{"x": [1]}')]
