"""lm-evaluation-harness as a real client: `lm_eval --model local-completions` runs a small
multiple-choice task of our own (tests/lm_eval_task/, local JSONL, no hub) against the live server,
and every per-choice loglikelihood it logs equals transformers' on the same weights.

lm-eval scores a choice by sending context + continuation as token ids with `echo: true,
logprobs: 1, max_tokens: 1` and summing the echoed logprobs of the continuation's tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import hf_reference
from tests.helpers.stack import ROOT

TASK_DIR = ROOT / "tests" / "lm_eval_task"
TASK = "pagedserve_mc"
TOLERANCE = 2e-3


def run_lm_eval(stack, model_dir: Path, output: Path) -> None:
    model_args = ",".join([
        "model=SmolLM2-135M-Instruct", f"base_url={stack.base_url}/completions",
        f"tokenizer={model_dir}", "tokenizer_backend=huggingface", "tokenized_requests=True",
        "max_retries=1", "num_concurrent=1"])
    # No network: the tokenizer is the local directory and the task's data a local file.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(output / "hf"),
           "OPENAI_API_KEY": "none"}
    lm_eval = [sys.executable, "-m", "lm_eval"]
    done = subprocess.run(
        [*lm_eval, "--model", "local-completions", "--model_args", model_args, "--tasks", TASK,
         "--include_path", str(TASK_DIR), "--batch_size", "4", "--output_path", str(output / "out"),
         "--log_samples"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def hf_loglikelihood(model_dir: Path, tokenizer, context: str, continuation: str) -> float:
    """transformers' log P(continuation | context), tokenized as lm-eval does (the context's
    trailing spaces move to the continuation; the pair is encoded whole, then split)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctxlen = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    model = hf_reference.load(str(model_dir))
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    targets = torch.tensor(whole[ctxlen:])
    return logprobs[ctxlen - 1:-1].gather(1, targets[:, None]).sum().item()


@pytest.mark.slow
def test_lm_eval_loglikelihoods_equal_transformers(smol_stack, model_dir, tmp_path):
    run_lm_eval(smol_stack, model_dir, tmp_path)
    samples_file = next((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    docs = [json.loads(line) for line in (TASK_DIR / "general_knowledge.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        arguments = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert [cont.strip() for _, cont in arguments] == doc["choices"]
        served = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [hf_loglikelihood(model_dir, tokenizer, ctx, cont) for ctx, cont in arguments]
        assert served == pytest.approx(expected, abs=TOLERANCE), doc["question"]
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    accuracy = json.loads(results_file.read_text())["results"][TASK]["acc,none"]
    assert accuracy == pytest.approx(correct / len(docs))
    print(f"lm-eval {TASK}: acc {accuracy:.3f} over {len(docs)} questions")
