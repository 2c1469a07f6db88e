"""Structured outputs and tool calls through the real processes and the real openai SDK: every
constrained output parses and validates (jsonschema is the judge), tool calls stream and reassemble
to the non-streamed call, bad constraints are 400s naming their field, unconstrained requests in
the same batch generate exactly what they generate alone, preemption keeps the grammar state."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel
from transformers import AutoTokenizer

from pagedserve.router.tool_prompt import with_calls_as_text, with_tool_definitions
from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers.stack import run_stack

MODEL = "SmolLM2-135M-Instruct"
SHAPES = {  # nested objects, arrays, enums, required fields, a pattern, $defs/$ref
    "$defs": {"Point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                       "y": {"type": "integer", "minimum": 0, "maximum": 9}}}},
    "type": "object", "additionalProperties": False,
    "required": ["code", "shape", "points", "meta"],
    "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                   "shape": {"enum": ["circle", "square"]},
                   "points": {"type": "array", "minItems": 1, "maxItems": 2,
                              "items": {"$ref": "#/$defs/Point"}},
                   "meta": {"type": "object", "additionalProperties": False, "required": ["ok"],
                            "properties": {"ok": {"type": "boolean"}}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}$"}}}}}
TOOLS = [WEATHER, TIME]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.fixture(scope="module")
def client(smol_stack):
    return OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=600)


def chat(client, messages, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 60)
    extra = {k: kw.pop(k) for k in ("structured_outputs",) if k in kw}
    return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def streamed_calls(chunks) -> tuple[list[tuple[str, dict]], str | None, str]:
    """A stream's tool-call deltas reassembled as OpenAI's SDK helpers do (by index), its last
    finish_reason and its content."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish, content


def validate_call(name: str, arguments: dict) -> None:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    jsonschema.validate(arguments, schema)


# ----- response_format and structured_outputs ---------------------------------------------------

def test_parse_with_a_pydantic_model(client):
    reply = client.chat.completions.parse(
        model=MODEL, response_format=City, temperature=0, max_tokens=60,
        messages=user("Paris is the capital of France and has 2100000 inhabitants. Give it as JSON."))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_with_defs_refs_patterns_and_enums_validates_for_every_choice(client):
    reply = chat(client, user("Describe a shape as JSON."), n=2, temperature=1.0, seed=11,
                 max_tokens=80, response_format={"type": "json_schema", "json_schema": {
                     "name": "shape", "schema": SHAPES, "strict": True}})
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason == "stop", (choice.message.content, reply.usage)
        jsonschema.validate(json.loads(choice.message.content), SHAPES)


def test_json_object_is_a_json_object(client):
    reply = chat(client, user('Answer with the JSON object {"answer": 42} and nothing else.'),
                 response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_regex_choice_and_grammar_on_completions_and_chat(client):
    def complete(prompt, spec, **kw):
        return client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20,
                                         extra_body={"structured_outputs": spec}, **kw).choices[0]
    with ThreadPoolExecutor(4) as pool:
        phone = pool.submit(complete, "Call me at ", {"regex": r"\(\d{3}\) \d{3}-\d{4}"})
        stopped = pool.submit(complete, "Call me at ", {"regex": r"\(\d{3}\) \d{3}-\d{4}"}, stop=["-"])
        grammar = pool.submit(complete, "The answer:", {"grammar": 'root ::= "It is " ("red" | "blue") "."'})
        choice = pool.submit(chat, client, user("Is the sky blue? Answer yes or no."),
                             structured_outputs={"choice": ["yes", "no"]})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone.result().text)
    assert phone.result().finish_reason == "stop"
    assert stopped.result().text == phone.result().text.split("-")[0]  # stop strings still apply
    assert grammar.result().text in ("It is red.", "It is blue.")
    assert choice.result().choices[0].message.content in ("yes", "no")


def test_max_tokens_cutting_a_json_object_short_finishes_with_length(client):
    reply = chat(client, user("Describe a shape as JSON."), max_tokens=5,
                 response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SHAPES}})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 5
    assert choice.message.content.startswith('{"code')  # keys in the schema's order
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


def test_constraints_that_do_not_compile_are_400s_naming_their_field(client, smol_stack):
    bad = [({"extra_body": {"structured_outputs": {"regex": "(ab"}}}, "structured_outputs",
            "parenthesis is not closed"),
           ({"extra_body": {"structured_outputs": {"grammar": "root ::= nope"}}}, "structured_outputs",
            "nope"),
           ({"response_format": {"type": "json_schema", "json_schema": {
               "name": "s", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}}}},
            "response_format", "$defs"),
           ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
               "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}], "tool_choice": "required"},
            "tools", "nowhere"),
           ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs",
            "exactly one"),
           ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
            "structured_outputs", "only one")]
    for kw, param, words in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=4, **kw)
        assert err.value.body["param"] == param, err.value.body
        assert words in err.value.body["message"]
        # The message speaks of the field the client wrote, not the scheduler's internal one.
        assert param == "structured_outputs" or "structured_outputs" not in err.value.body["message"]
    assert smol_stack.wait_idle(timeout=30).kv_blocks_used == 0


def test_unconstrained_requests_in_a_constrained_batch_generate_as_alone(client, smol_stack, model_dir):
    prompt = AutoTokenizer.from_pretrained(model_dir)("The history of the city of Lyon begins")["input_ids"]
    alone = smol_stack.generate(prompt, 24, ignore_eos=True)
    constraint = pb.StructuredOutputParams(json=json.dumps(SHAPES))
    with ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(smol_stack.generate, prompt, 24, structured_outputs=constraint)
                       for _ in range(3)]
        beside = smol_stack.generate(prompt, 24, ignore_eos=True)
        outputs = [c.result() for c in constrained]
    assert beside == alone
    assert all(out != alone[:len(out)] for out in outputs)  # the constraint did bite


def test_grpc_clients_get_the_same_constraints_and_invalid_argument(smol_stack, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("My zip code is")["input_ids"]
    out = smol_stack.generate(prompt, 10, structured_outputs=pb.StructuredOutputParams(regex=r" \d{5}"))
    assert re.fullmatch(r" \d{5}", tokenizer.decode(out, skip_special_tokens=True))
    for params, words in ((pb.StructuredOutputParams(regex="[a-"), "structured_outputs: regex:"),
                          (pb.StructuredOutputParams(), "structured_outputs: set exactly one")):
        with pytest.raises(grpc.RpcError) as err:
            smol_stack.generate(prompt, 4, structured_outputs=params)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(words)


# ----- tools ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_calls_validate_and_stream_as_they_answer(client, tool_choice):
    kw = dict(tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=40)
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(chat, client, ASK_WEATHER, **kw)
        streamed = pool.submit(lambda: streamed_calls(chat(client, ASK_WEATHER, stream=True, **kw)))
    choice = whole.result().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = calls_of(choice.message)
    assert len(calls) == 1
    for name, arguments in calls:
        validate_call(name, arguments)
    if isinstance(tool_choice, dict):
        assert calls[0][0] == "get_time"
    assert choice.message.tool_calls[0].id.startswith("chatcmpl-tool-")
    assert streamed.result() == (calls, "tool_calls", "")


def test_required_with_parallel_calls_gives_a_list_of_valid_calls(client):
    # SmolLM2 tends to repeat calls until max_tokens: the calls completed by then still count.
    reply = chat(client, user("Weather in Paris and in Lyon, in celsius?"), tools=TOOLS,
                 tool_choice="required", n=2, temperature=1.0, seed=5, max_tokens=50)
    for choice in reply.choices:
        assert choice.finish_reason in ("tool_calls", "length"), choice.message.content
        assert choice.message.tool_calls and choice.message.content is None
        for name, arguments in calls_of(choice.message):
            validate_call(name, arguments)


def test_auto_parses_hermes_tool_calls_from_the_text(client):
    # The model is made to write a Hermes call (a regex), which the hermes parser then finds.
    forced = (r'Let me check\.<tool_call>\{"name": "get_weather", "arguments": '
              r'\{"city": "(Paris|Lyon)", "unit": "celsius"\}\}</tool_call>')
    kw = dict(tools=TOOLS, tool_choice="auto", structured_outputs={"regex": forced}, max_tokens=120)
    with ThreadPoolExecutor(4) as pool:  # one batch: the forced text takes SmolLM2 many tokens
        whole = pool.submit(chat, client, ASK_WEATHER, **kw)
        streamed = pool.submit(lambda: streamed_calls(chat(client, ASK_WEATHER, stream=True, **kw)))
        no_tools = pool.submit(chat, client, ASK_WEATHER, structured_outputs={"regex": forced}, max_tokens=120)
        plain = pool.submit(chat, client, ASK_WEATHER, tools=TOOLS, structured_outputs={"choice": ["Sunny."]})
    whole = whole.result().choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Let me check."
    calls = calls_of(whole.message)
    assert calls[0][0] == "get_weather"
    validate_call(*calls[0])
    assert streamed.result() == (calls, "tool_calls", "Let me check.")
    assert no_tools.result().choices[0].message.content.startswith("Let me check.<tool_call>")
    assert plain.result().choices[0].message.content == "Sunny."
    assert not plain.result().choices[0].message.tool_calls


def test_tool_results_and_assistant_calls_render_through_the_chat_template(client, smol_stack, model_dir):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    messages = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    reply = chat(client, messages, tools=TOOLS, tool_choice="none", max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")
    hf = AutoTokenizer.from_pretrained(model_dir)
    template_messages = messages[:1] + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": json.loads(arguments)}}]},
        messages[2]]
    # SmolLM2's template renders neither tools nor tool calls: both go into the text, in the
    # hermes format (router/tool_prompt.py), so that the model sees them
    template_messages = with_calls_as_text(with_tool_definitions(template_messages, TOOLS, "hermes"),
                                           "hermes")
    expected = hf.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)
    assert "21 degrees and sunny" in expected and '"description": "The time in a time zone"' in expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in expected
    assert reply.usage.prompt_tokens == len(hf(expected, add_special_tokens=False)["input_ids"])


# ----- preemption -------------------------------------------------------------------------------

def test_preempted_constrained_requests_resume_their_grammar(model_dir, tmp_path):
    # Each request needs up to ceil((~44 + 100) / 16) = 9 blocks: 12 blocks hold one at a time. The
    # room is generous because a sampled path may split the JSON into more tokens than its canonical
    # tokenization (one seed's reply used 60 tokens for a 49-token text); seeded draws do not depend
    # on the batch, so the outcome is the same run after run.
    with run_stack(model_dir, "--served-model-name", MODEL, "--num-gpu-blocks-override", "12",
                   "--no-enable-prefix-caching", log_dir=tmp_path) as small:
        client = OpenAI(base_url=small.base_url, api_key="none", max_retries=0, timeout=600)
        prompts = [f"Describe shape number {i} as JSON, with its code and points." for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda p: chat(
                client, user(p), max_tokens=100, temperature=1.0, seed=1,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SHAPES}}),
                prompts))
        stats = small.wait_idle()
        assert stats.num_preemptions > 0, "12 blocks served 4 requests of 7 without preempting"
        assert stats.kv_blocks_used == 0
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (choice.message.content, reply.usage)
        jsonschema.validate(json.loads(choice.message.content), SHAPES)
