"""A Generate request checked and its sampling parameters resolved, once, before it is queued.

The effective SamplingParams are the request's own fields, then the model's defaults
(generation_config.json, which the workers read and report: ModelInfo.sampling_defaults), then
scheduler.proto's defaults; unset max_tokens becomes the room the context leaves, top_k -1 becomes
0 (both mean off). Every range is checked here (the table is pagedserve/sampling_ranges.py) and an
error names the field. The one message that results is the request's params from then on: the
scheduler's SamplingLimits are read from it, and every NewSequence carries it to the workers, which
read it as it is.
"""
from __future__ import annotations

from pagedserve.sampling_ranges import RANGES
from pagedserve.v1 import scheduler_pb2 as pb

from .kv_cache_manager import KVCacheManager

# scheduler.proto's default of every field that has one (seed, logprobs, num_prompt_logprobs:
# unset means none, and stays unset).
PROTO_DEFAULTS = pb.SamplingParams(
    temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
    repetition_penalty=1.0, min_tokens=0, n=1)


class InvalidRequest(ValueError):
    """A request the scheduler refuses; the message starts with the field's name."""


def check(request: pb.GenerateRequest, info: pb.ModelInfo, kv: KVCacheManager) -> pb.SamplingParams:
    """The request's effective SamplingParams, every field with a default set. `info` gives the
    vocabulary, the context length and the model's defaults; `kv` says whether the sequence could
    ever fit the cache (its size now: a restarted worker may hold fewer blocks).
    Raises InvalidRequest naming the field."""
    prompt = request.prompt_token_ids
    check_prompt(prompt, info.vocab_size, info.max_model_len)
    params = with_defaults(request.params, info.sampling_defaults)
    if not request.params.HasField("max_tokens"):
        params.max_tokens = info.max_model_len - len(prompt)
    check_sampling(params, info.vocab_size)
    check_length(len(prompt), params.max_tokens, info.max_model_len, kv)
    check_resume(request.resume_output_token_ids, params, info.vocab_size)
    return params


def check_resume(resumed, params: pb.SamplingParams, vocab_size: int) -> None:
    """A continuation (GenerateRequest.resume_output_token_ids) is one sequence's output so far,
    shorter than max_tokens: a longer one would have ended already. Prompt plus max_tokens fit
    the context (check_length), so prompt plus these tokens do too."""
    if not resumed:
        return
    if params.n != 1:
        raise InvalidRequest(f"resume_output_token_ids: a continuation has one sequence, but n "
                             f"is {params.n}")
    if len(resumed) >= params.max_tokens:
        raise InvalidRequest(f"resume_output_token_ids: {len(resumed)} tokens, but max_tokens is "
                             f"{params.max_tokens}: nothing is left to generate")
    bad = next((t for t in resumed if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"resume_output_token_ids: token id {bad} is outside the vocabulary "
                             f"[0, {vocab_size})")


def with_defaults(params: pb.SamplingParams,
                  model_defaults: pb.SamplingParams | None = None) -> pb.SamplingParams:
    """A copy of `params` whose unset fields take `model_defaults`' values, else the proto's
    (max_tokens stays as it is: its default needs the prompt)."""
    resolved = pb.SamplingParams()
    resolved.CopyFrom(PROTO_DEFAULTS)
    if model_defaults is not None:
        resolved.MergeFrom(model_defaults)
    resolved.MergeFrom(params)  # proto3 optional: only the fields the request set
    if resolved.top_k == -1:
        resolved.top_k = 0  # vLLM's "off", as 0 is: the worker knows one spelling
    return resolved


def check_prompt(prompt, vocab_size: int, max_model_len: int) -> None:
    if not prompt:
        raise InvalidRequest("prompt_token_ids: the prompt is empty")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt_token_ids: token id {bad} is outside the vocabulary "
                             f"[0, {vocab_size})")
    if len(prompt) >= max_model_len:
        raise InvalidRequest(f"prompt_token_ids: the prompt has {len(prompt)} tokens, but the "
                             f"maximum context length is {max_model_len} (prompt plus output)")


def check_length(num_prompt: int, max_tokens: int, max_model_len: int, kv: KVCacheManager) -> None:
    """Prompt plus max_tokens must fit the context and, alone, the whole KV cache (else the
    request would wait forever)."""
    if num_prompt + max_tokens > max_model_len:
        raise InvalidRequest(f"max_tokens: {max_tokens} output tokens plus the prompt's "
                             f"{num_prompt} exceed the maximum context length {max_model_len}")
    needed = kv.blocks_for(num_prompt + max_tokens)
    if needed > kv.num_blocks:
        raise InvalidRequest(f"max_tokens: the request needs {needed} KV blocks, more than the "
                             f"whole cache holds ({kv.num_blocks}); lower max_tokens or the prompt")


def check_sampling(p: pb.SamplingParams, vocab_size: int) -> None:
    """Every set field in its range (min_tokens also within max_tokens, when that is set), every
    token id in the vocabulary. Raises InvalidRequest naming the field."""
    for name, allowed in RANGES.items():
        value = getattr(p, name)
        if p.HasField(name) and value not in allowed:
            shown = f"{value:.6g}" if isinstance(value, float) else value
            raise InvalidRequest(f"{name}: must be {allowed}, got {shown}")
    if p.HasField("max_tokens") and p.min_tokens > p.max_tokens:
        raise InvalidRequest(f"min_tokens: must be at most max_tokens ({p.max_tokens}), "
                             f"got {p.min_tokens}")
    if any(not word.token_ids for word in p.bad_words):
        raise InvalidRequest("bad_words: a banned sequence has no token ids")
    banned = [t for word in p.bad_words for t in word.token_ids]
    for name, ids in (("logit_bias", p.logit_bias.keys()), ("stop_token_ids", p.stop_token_ids),
                      ("allowed_token_ids", p.allowed_token_ids), ("bad_words", banned)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
