"""OpenAI request bodies (completions and chat) checked and turned into what one generation needs:
prompts in token ids, the scheduler's SamplingParams, and the options the router applies itself
(stop strings, logprobs, echo, streaming)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.sampling_ranges import INT32_MAX, OPENAI_RANGES
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.bad_words import bad_words_token_ids
from pagedserve.router.errors import invalid, model_not_found
from pagedserve.router.field_policy import check_fields, check_keys
from pagedserve.router.fields import Fields
from pagedserve.router.lora import LoraAdapter
from pagedserve.router.model import ServedModel
from pagedserve.router.reasoning_parsers import ThinkFirst, think_first
from pagedserve.router.prompts import (Prompt, chat_messages, chat_prompt, check_token_ids,
                            completion_prompts, truncate_prompts)
from pagedserve.router.structured_outputs import Constraint, one_constraint, request_constraint
from pagedserve.router.tool_calls import Tools, parse_tools, tool_constraint

STREAM_OPTIONS = ("include_usage", "continuous_usage_stats")  # OpenAI's, then vLLM's
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat has none)
# apply_chat_template's own arguments: chat_template_kwargs must not smuggle them in
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass
class GenerationRequest:
    kind: str                     # "chat" or "completion"
    prompts: list[Prompt]
    params: pb.SamplingParams
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    logprobs: int | None          # alternatives per token; None: no logprobs at all
    echo: bool
    prompt_logprobs: int | None   # vLLM's field: the choice's (chat: response's) prompt_logprobs
    generate: bool                # False for max_tokens 0 with echo: the prompt alone comes back
    skip_special_tokens: bool
    hidden_stop_ids: frozenset[int]  # tokens that end a sequence without showing in its text
    include_stop_str: bool = False   # the stop string that ended a choice stays in its text
    chat_echo: str = ""              # chat `echo`: the last assistant message, before each reply
    tokens_as_ids: bool = False      # logprobs name tokens "token_id:N" (vLLM's option)
    tools: Tools | None = None       # chat's tools, when calls can be made
    constraint_param: str | None = None  # the field a structured-output constraint came from
    continuous_usage: bool = False       # vLLM's continuous_usage_stats: usage on every chunk
    reasoning_parser: str | None = None  # chat's, when the thinking is split from the answer
    include_reasoning: bool = True       # vLLM's: false drops the thinking
    think_first: ThinkFirst | None = None  # a constrained reply that thinks before its answer
    lora: LoraAdapter | None = None  # the adapter `model` names (router/lora.py); None: the base model


def parse_completion(body: Any, model: ServedModel) -> GenerationRequest:
    f = fields_of(body, model, "completion")
    if f.string("suffix"):
        raise invalid("suffix", "'suffix' (insertion) is not supported.")
    logprobs = integer(f, "logprobs")
    echo = f.boolean("echo", False)
    # vLLM's way with max_tokens 0 (echo only): the scheduler makes one token, which is dropped.
    max_tokens = f.integer("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, minimum=0 if echo else 1,
                           maximum=INT32_MAX)
    params = sampling_params(f, model, max(max_tokens, 1), "max_tokens")
    prompts = completion_prompts(f.raw("prompt"), model.tokenizer, model.vocab_size,
                                 f.boolean("add_special_tokens", True))
    prompts = truncate(f, prompts, model)
    check_context(prompts, max_tokens, model, "prompt", "max_tokens")
    # Echoed logprobs start with the prompt's: they come from the scheduler's prompt logprobs.
    req = generation(f, "completion", prompts, params, logprobs, echo, model,
                     echo_logprobs=logprobs if echo else None, generate=max_tokens > 0)
    return constrained(req, request_constraint(f))


def parse_chat(body: Any, model: ServedModel) -> GenerationRequest:
    f = fields_of(body, model, "chat")
    tools = parse_tools(f, model.tool_call_parser)
    constraint = one_constraint(request_constraint(f), tool_constraint(tools))
    want_logprobs = f.boolean("logprobs", False)
    top = integer(f, "top_logprobs", "logprobs")
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
    name = "max_completion_tokens" if f.given("max_completion_tokens") else "max_tokens"
    max_tokens = integer(f, name, "max_tokens")
    params = sampling_params(f, model, max_tokens, name)
    messages = chat_messages(f.raw("messages"))
    prompt = chat_prompt(messages, model.tokenizer, **chat_template_options(f),
                         tools=tools.definitions if tools else None,
                         tool_parser=tools.parser if tools else model.tool_call_parser)
    [prompt] = truncate(f, [prompt], model)
    check_context([prompt], max_tokens, model, "messages", name)
    logprobs = (top or 0) if want_logprobs else None
    req = generation(f, "chat", [prompt], params, logprobs, False, model)
    # vLLM's chat echo: a reply continuing the assistant's last message starts with that message
    if f.boolean("echo", False) and messages[-1]["role"] == "assistant":
        req.chat_echo = messages[-1]["content"]
    req.tools = tools if tools and tools.calls_possible else None
    req.reasoning_parser = model.reasoning_parser
    req.include_reasoning = f.boolean("include_reasoning", True)
    if model.reasoning_parser and constraint is not None and req.n == 1:
        # the constraint then holds the answer only (router/thinking_first.py)
        req.think_first = think_first(model.reasoning_parser, prompt.text,
                                      lambda text: model.tokenizer.encode(text, False))
    return constrained(req, constraint)


def constrained(req: GenerationRequest, constraint: Constraint | None) -> GenerationRequest:
    """The request with its structured-output constraint (router/structured_outputs.py)."""
    if constraint is not None:
        req.params.structured_outputs.CopyFrom(constraint.params)
        req.constraint_param = constraint.param
    return req


def fields_of(body: Any, model: ServedModel, endpoint: str) -> Fields:
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.")
    check_fields(body, endpoint)
    f = Fields(body)
    check_model(f.string("model"), model)
    return f


def check_model(name: str | None, model: ServedModel) -> None:
    """`model` may be left out; when given it must be the served name (or the model's path)."""
    if name is not None and name not in (model.name, model.path) and not (model.loras and model.loras.get(name)):
        raise model_not_found(name, model.name)


def generation(f: Fields, kind: str, prompts: list[Prompt], params: pb.SamplingParams,
               logprobs: int | None, echo: bool, model: ServedModel,
               echo_logprobs: int | None = None, generate: bool = True) -> GenerationRequest:
    stream = f.boolean("stream", False)
    options = f.object("stream_options")
    if f.given("stream_options") and not stream:
        raise invalid("stream_options", "'stream_options' is only allowed with 'stream': true.")
    check_keys(options, "stream_options", STREAM_OPTIONS)
    include_usage = Fields(options).boolean("include_usage", False)
    continuous_usage = Fields(options).boolean("continuous_usage_stats", False)
    if logprobs is not None:
        params.logprobs = logprobs
    include_stop_str = f.boolean("include_stop_str_in_output", False)
    prompt_logprobs = integer(f, "prompt_logprobs", "num_prompt_logprobs")
    if prompt_logprobs is not None and stream:
        raise invalid("prompt_logprobs", "'prompt_logprobs' is not available with 'stream': "
                      "true (as in vLLM); use 'echo' with 'logprobs' to stream them.")
    wanted = [k for k in (prompt_logprobs, echo_logprobs) if k is not None]
    if wanted:
        params.num_prompt_logprobs = max(wanted)
    hidden = set(params.stop_token_ids) | (set() if params.ignore_eos else model.eos_token_ids)
    return GenerationRequest(
        kind=kind, prompts=prompts, params=params, n=params.n, stream=stream,
        include_usage=include_usage, stop=[s for s in f.strings("stop") if s],
        logprobs=logprobs, echo=echo, prompt_logprobs=prompt_logprobs, generate=generate,
        skip_special_tokens=f.boolean("skip_special_tokens", True),
        # vLLM shows the stop token's text too when stop strings are kept (EOS stays hidden as
        # a special token unless skip_special_tokens is false)
        hidden_stop_ids=frozenset() if include_stop_str else frozenset(hidden),
        include_stop_str=include_stop_str, continuous_usage=continuous_usage,
        tokens_as_ids=f.boolean("return_tokens_as_token_ids", False),
        lora=model.loras.get(f.string("model")) if model.loras else None)


def sampling_params(f: Fields, model: ServedModel, max_tokens: int | None,
                    max_tokens_param: str) -> pb.SamplingParams:
    """The OpenAI and vLLM sampling fields, range-checked, in the scheduler's message. Fields left
    out stay unset: the scheduler resolves them (the model's defaults, then the proto's)."""
    p = pb.SamplingParams(n=integer(f, "n", default=1))
    best_of = f.integer("best_of")
    if best_of is not None and best_of != p.n:
        raise invalid("best_of", "'best_of' other than 'n' is not supported.")
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        set_if(p, name, number(f, name))
    set_if(p, "top_k", integer(f, "top_k"))
    seed = f.integer("seed")
    if seed is not None:
        p.seed = seed % (1 << 64)  # OpenAI seeds are signed; the proto's is uint64
    set_if(p, "max_tokens", max_tokens)
    min_tokens = integer(f, "min_tokens")
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise invalid("min_tokens", f"'min_tokens' ({min_tokens}) must not exceed "
                      f"'{max_tokens_param}' ({max_tokens}).")
    set_if(p, "min_tokens", min_tokens)
    p.stop_token_ids.extend(f.integers("stop_token_ids", 0, model.vocab_size))
    p.ignore_eos = f.boolean("ignore_eos", False)
    p.logit_bias.update(logit_bias(f, model.vocab_size))
    if f.given("allowed_token_ids"):
        p.allowed_token_ids.extend(f.integers("allowed_token_ids", 0, model.vocab_size))
        if not p.allowed_token_ids:
            raise invalid("allowed_token_ids", "'allowed_token_ids' must not be empty.")
    for ids in bad_words_token_ids(f.strings("bad_words"), model.tokenizer):
        p.bad_words.add(token_ids=ids)
    return p


def chat_template_options(f: Fields) -> dict:
    """vLLM's chat template fields, as keyword arguments of chat_prompt."""
    add_generation_prompt = f.boolean("add_generation_prompt", True)
    continue_final = f.boolean("continue_final_message", False)
    if continue_final and f.raw("add_generation_prompt") is True:
        raise invalid("continue_final_message", "Cannot set both 'continue_final_message' and "
                      "'add_generation_prompt' to true.")
    template_kwargs = f.object("chat_template_kwargs")
    clash = sorted(set(template_kwargs) & TEMPLATE_ARGUMENTS)
    if clash:
        raise invalid("chat_template_kwargs", f"'chat_template_kwargs' may not set {clash[0]!r}: "
                      "it is a request field of its own or the server's.")
    return {"add_generation_prompt": add_generation_prompt and not continue_final,
            "continue_final_message": continue_final,
            "add_special_tokens": f.boolean("add_special_tokens", False),
            "template_kwargs": template_kwargs}


def truncate(f: Fields, prompts: list[Prompt], model: ServedModel) -> list[Prompt]:
    """vLLM's `truncate_prompt_tokens`: keep each prompt's last k tokens (-1: max_model_len)."""
    keep = f.integer("truncate_prompt_tokens", minimum=-1, maximum=INT32_MAX)
    if keep is None:
        return prompts
    if keep == 0:
        raise invalid("truncate_prompt_tokens", "'truncate_prompt_tokens' must be -1 or >= 1.")
    return truncate_prompts(prompts, model.max_model_len if keep == -1 else keep)


def integer(f: Fields, name: str, field: str | None = None, default: int | None = None) -> int | None:
    """Body field `name`, an integer in the range of SamplingParams.`field` (default: the same
    name), from the one table of ranges that the scheduler checks too."""
    allowed = OPENAI_RANGES[field or name]
    return f.integer(name, default, minimum=allowed.minimum, maximum=allowed.maximum)


def number(f: Fields, name: str) -> float | None:
    """Body field `name`, a number in the range of SamplingParams.`name`."""
    allowed = OPENAI_RANGES[name]
    return f.number(name, minimum=allowed.minimum, maximum=allowed.maximum, above=allowed.above)


def set_if(params: pb.SamplingParams, name: str, value: Any) -> None:
    if value is not None:
        setattr(params, name, value)


def logit_bias(f: Fields, vocab_size: int) -> dict[int, float]:
    """`logit_bias`: token ids (as strings: JSON keys are) to biases in [-100, 100]."""
    bias = {}
    for key, value in f.object("logit_bias").items():
        try:
            token = int(key)
        except ValueError:
            raise invalid("logit_bias", f"'logit_bias' key {key!r} is not a token id.") from None
        check_token_ids([token], vocab_size, "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("logit_bias", f"'logit_bias' value for {key} must be a number.")
        if value not in OPENAI_RANGES["logit_bias"]:
            raise invalid("logit_bias", f"'logit_bias' value for {key} must be "
                          f"{OPENAI_RANGES['logit_bias']}.")
        bias[token] = float(value)
    return bias


def check_context(prompts: list[Prompt], max_tokens: int | None, model: ServedModel,
                  prompt_param: str, max_tokens_param: str) -> None:
    """Every prompt plus its completion must fit the model's context."""
    limit = model.max_model_len
    for prompt in prompts:
        size = len(prompt.token_ids)
        wanted = size + (max_tokens or 1)
        if wanted <= limit:
            continue
        param = prompt_param if size >= limit or max_tokens is None else max_tokens_param
        raise invalid(param, f"This model's maximum context length is {limit} tokens. However, "
                      f"you requested {wanted} tokens ({size} in the {prompt_param}, "
                      f"{max_tokens or 1} for the completion). Reduce the length of the "
                      f"{prompt_param} or '{max_tokens_param}'.", "context_length_exceeded")
