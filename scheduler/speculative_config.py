"""--speculative-config: vLLM's JSON object, read once at start-up.

Two methods. "ngram" (prompt lookup decoding) proposes, in the scheduler, from the sequence's own
prompt and output, the tokens that followed the longest earlier match of its last n-gram.
"draft_model" names a small model of the same vocabulary ("model": its directory) that the worker
runs to propose (worker/draft_model.py): the scheduler only decides how many drafts a sequence gets
and allocates their KV slots. The worker verifies the proposals (worker/rejection_sampler.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.flags import json_object_flag

METHODS = ("ngram", "draft_model")
KEYS = {"ngram": {"prompt_lookup_max", "prompt_lookup_min"}, "draft_model": {"model"}}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int  # k: drafts proposed per sequence per step, at most
    prompt_lookup_max: int       # the longest n-gram matched
    prompt_lookup_min: int       # the shortest n-gram matched
    model: str | None = None     # draft_model: the draft's directory (the worker loads it)


def parse_speculative_config(text: str | None) -> SpeculativeConfig | None:
    """The flag's JSON text, checked; None when the flag is not given. Raises ValueError naming
    the problem (unknown method or key, a value out of range). vLLM's defaults: prompt_lookup_min
    defaults to prompt_lookup_max, and either to the other; both unset is 5 and 5 here."""
    if not text:
        return None
    value = json_object_flag(text, "--speculative-config")
    method = value.get("method")
    if method not in METHODS:
        raise ValueError(f"--speculative-config: method {method!r} is not served; use one of {list(METHODS)}")
    known = {"method", "num_speculative_tokens"} | KEYS[method]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"--speculative-config: unknown keys {unknown} for method {method!r}")
    k = value.get("num_speculative_tokens")
    high, low = value.get("prompt_lookup_max"), value.get("prompt_lookup_min")
    high = high if high is not None else (low if low is not None else 5)
    low = low if low is not None else high
    for name, v in (("num_speculative_tokens", k), ("prompt_lookup_max", high), ("prompt_lookup_min", low)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"--speculative-config: {name} must be a positive integer, got {v!r}")
    if low > high:
        raise ValueError(f"--speculative-config: prompt_lookup_min {low} exceeds prompt_lookup_max {high}")
    model = value.get("model")
    if method == "draft_model" and (not isinstance(model, str) or not model):
        raise ValueError("--speculative-config: method 'draft_model' needs \"model\": the draft model's directory")
    return SpeculativeConfig(method, k, high, low, model)
