"""transformers itself, the judge of correctness: greedy generate on the same directory."""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch

TINY_PARAMETERS = 10_000_000  # tests/helpers/tiny_models.py's are ~0.2M; SmolLM2's 135M


@contextmanager
def threads_for(model):
    """One torch thread while a tiny model runs, the caller's count restored after: its matmuls
    are smaller than OpenMP's fork and join, which on a busy 2-core machine made 100 greedy tokens
    of a tiny Mistral cost 12 s on 2 threads against 0.4 s on one."""
    before = torch.get_num_threads()
    if model.num_parameters() < TINY_PARAMETERS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=4)
def load(model_dir: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def greedy(model_dir, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    model = load(str(model_dir))
    kwargs = {"eos_token_id": None} if ignore_eos else {}
    with torch.inference_mode(), threads_for(model):
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             **kwargs)
    return out[0, len(prompt_ids):].tolist()


def constrained_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int,
                       allowed: list[int] | None = None, forbidden=lambda output: ()) -> list[int]:
    """Greedy decoding by transformers' forward pass, one token at a time, where each step's
    argmax is taken only over `allowed` (all tokens when None) minus `forbidden(output so far)`.
    Runs to max_new_tokens (no EOS stop): the judge of allowed_token_ids and bad_words."""
    model = load(str(model_dir))
    ids = list(prompt_ids)
    with torch.inference_mode(), threads_for(model):
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            mask = torch.full_like(logits, float("-inf"))
            mask[allowed if allowed is not None else slice(None)] = 0
            mask[list(forbidden(ids[len(prompt_ids):]))] = float("-inf")
            ids.append(int((logits + mask).argmax()))
    return ids[len(prompt_ids):]
