"""Benchmark workloads: what each request sends (prompt token ids or text) and how many tokens it
must generate. Prompts go out as token ids where possible, so every system computes exactly the
same tokens (text would be re-tokenized by each server)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_VOCAB_SIZE = 32000  # valid ids for every tokenizer of the Llama family and most others
# Ids below this are where tokenizers keep their special tokens (BOS, EOS, chat markers): random
# prompts avoid them, so no prompt looks like an end of text or a chat turn.
FIRST_ORDINARY_ID = 1000


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


def length_range(mean: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's --random-range-ratio: lengths drawn uniformly from [mean*(1-r), mean*(1+r)]."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), not {range_ratio}")
    return max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    first = min(FIRST_ORDINARY_ID, vocab_size // 2)
    return [
        BenchRequest(rng.integers(first, vocab_size, size=int(n)).tolist(), int(n), int(m))
        for n, m in zip(input_lens, output_lens)
    ]


def jsonl_requests(path: str | Path, num_prompts: int, default_output_len: int) -> list[BenchRequest]:
    """One JSON object per line: "prompt" (text or token ids) and, optionally, "output_len".
    The prompt length of a text prompt is counted by the server (usage), so it is 0 here."""
    requests = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if "prompt" not in item:
                raise ValueError(f"{path}:{number}: every line needs a \"prompt\" (text or token ids)")
            prompt = item["prompt"]
            prompt_len = len(prompt) if isinstance(prompt, list) else 0
            requests.append(BenchRequest(prompt, prompt_len, int(item.get("output_len", default_output_len))))
            if len(requests) == num_prompts:
                break
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return requests


def vocab_size_of(model_dir: str | None) -> int:
    """The vocabulary of a Hugging Face directory's config.json, or DEFAULT_VOCAB_SIZE when the
    model is only a served name."""
    config = Path(model_dir or "") / "config.json"
    if model_dir and config.is_file():
        return int(json.loads(config.read_text()).get("vocab_size", DEFAULT_VOCAB_SIZE))
    return DEFAULT_VOCAB_SIZE
