"""transformers as a serving baseline: the workload through `model.generate`, greedy, exactly each
request's output length, either one request at a time or in static batches (left padding; a batch
runs until its longest request is done, and only each request's own tokens count as output).

Every request arrives at the start, as in `bench serve` with an infinite request rate, so a
request's TTFT includes the batches that ran before its own. A streamer timestamps each step."""
from __future__ import annotations

import time

import torch

from .client import RequestOutput
from .datasets import BenchRequest


class StepClock:
    """A generate() streamer that only notes when each step's tokens are out: the first put()
    is the prompt, each later one a new token for every row."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def run_batch(model, batch: list[BenchRequest], start: float, pad_id: int) -> list[RequestOutput]:
    ids, mask = left_padded([r.prompt for r in batch], pad_id)
    steps = max(r.output_len for r in batch)
    clock = StepClock()
    with torch.inference_mode():
        # eos_token_id=None and min_new_tokens: every row runs its full length (ignore_eos).
        model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       eos_token_id=None, pad_token_id=pad_id, streamer=clock)
    outputs = []
    for r in batch:
        times = clock.times[: r.output_len]
        outputs.append(RequestOutput(
            success=len(times) == r.output_len, prompt_len=r.prompt_len, output_tokens=len(times),
            ttft=times[0] - start, itl=[b - a for a, b in zip(times, times[1:])], latency=times[-1] - start,
            error="" if len(times) == r.output_len else f"generate stopped after {len(times)} tokens"))
    return outputs


def run_static_batches(model, requests: list[BenchRequest], batch_size: int, progress=None) -> tuple[list[RequestOutput], float]:
    """The requests in arrival order, batch_size at a time; returns the outputs and the duration."""
    if any(not isinstance(r.prompt, list) for r in requests):
        raise ValueError("the transformers baseline needs prompts as token ids (--dataset-name random, or "
                         "jsonl lines whose prompt is a list of ids)")
    pad_id = model.generation_config.pad_token_id or 0
    outputs: list[RequestOutput] = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        outputs += run_batch(model, requests[i: i + batch_size], start, pad_id)
        if progress is not None:
            progress.update(len(requests[i: i + batch_size]))
    return outputs, time.perf_counter() - start
