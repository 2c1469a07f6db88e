"""Checks a Generate request before it is queued: every error names the field that is wrong."""
from __future__ import annotations

from pagedserve.v1 import scheduler_pb2 as pb

MAX_N = 128
MAX_LOGPROBS = 20


class InvalidRequest(ValueError):
    pass


def check(request: pb.GenerateRequest, vocab_size: int, max_model_len: int, num_blocks: int,
          block_size: int) -> int:
    """Raises InvalidRequest naming the field; returns the request's max_tokens."""
    prompt = request.prompt_token_ids
    p = request.params
    if not prompt:
        raise InvalidRequest("prompt_token_ids: the prompt is empty")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt_token_ids: token id {bad} is outside the vocabulary "
                             f"[0, {vocab_size})")
    if len(prompt) >= max_model_len:
        raise InvalidRequest(f"prompt_token_ids: the prompt has {len(prompt)} tokens, but the "
                             f"maximum context length is {max_model_len} (prompt plus output)")
    room = max_model_len - len(prompt)
    max_tokens = p.max_tokens if p.HasField("max_tokens") else room
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens: must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise InvalidRequest(f"max_tokens: {max_tokens} output tokens plus the prompt's "
                             f"{len(prompt)} exceed the maximum context length {max_model_len}")
    needed = -(-(len(prompt) + max_tokens) // block_size)
    if needed > num_blocks:
        raise InvalidRequest(f"max_tokens: the request needs {needed} KV blocks, more than the "
                             f"whole cache holds ({num_blocks}); lower max_tokens or the prompt")
    check_sampling(p, vocab_size, max_tokens)
    return max_tokens


def check_sampling(p: pb.SamplingParams, vocab_size: int, max_tokens: int) -> None:
    if p.HasField("temperature") and not p.temperature >= 0:
        raise InvalidRequest(f"temperature: must be >= 0, got {p.temperature}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise InvalidRequest(f"top_p: must be in (0, 1], got {p.top_p}")
    if p.HasField("top_k") and p.top_k < -1:
        raise InvalidRequest(f"top_k: must be -1, 0 (off) or positive, got {p.top_k}")
    if p.HasField("min_p") and not 0 <= p.min_p <= 1:
        raise InvalidRequest(f"min_p: must be in [0, 1], got {p.min_p}")
    if p.HasField("repetition_penalty") and not p.repetition_penalty > 0:
        raise InvalidRequest(f"repetition_penalty: must be > 0, got {p.repetition_penalty}")
    if p.HasField("n") and not 1 <= p.n <= MAX_N:
        raise InvalidRequest(f"n: must be between 1 and {MAX_N}, got {p.n}")
    if p.HasField("logprobs") and not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs: must be between 0 and {MAX_LOGPROBS}, got {p.logprobs}")
    if p.HasField("num_prompt_logprobs") and not 0 <= p.num_prompt_logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"num_prompt_logprobs: must be between 0 and {MAX_LOGPROBS}, got "
                             f"{p.num_prompt_logprobs}")
    if p.HasField("min_tokens") and not 0 <= p.min_tokens <= max_tokens:
        raise InvalidRequest(f"min_tokens: must be between 0 and max_tokens ({max_tokens}), "
                             f"got {p.min_tokens}")
    if any(not word.token_ids for word in p.bad_words):
        raise InvalidRequest("bad_words: a banned sequence has no token ids")
    banned = [t for word in p.bad_words for t in word.token_ids]
    for name, ids in (("logit_bias", p.logit_bias.keys()), ("stop_token_ids", p.stop_token_ids),
                      ("allowed_token_ids", p.allowed_token_ids), ("bad_words", banned)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
