"""Speculative decoding through the real processes (`pagedserve serve --speculative-config`): a
repetitive prompt's drafts are mostly accepted (read from /metrics, under vLLM's spec_decode
names), and the greedy output is transformers' own."""
from __future__ import annotations

import json

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from tests.helpers import hf_reference
from tests.helpers.live_stack import delta, scrape
from tests.helpers.stack import generate_all, run_stack

MODEL = "SmolLM2-135M-Instruct"
K = 4
SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
                   "prompt_lookup_min": 2})


@pytest.fixture(scope="module")
def spec_stack(model_dir, tmp_path_factory):
    with run_stack(model_dir, "--served-model-name", MODEL, "--speculative-config", SPEC,
                   "--kv-cache-memory-bytes", str(128 << 20), "--max-model-len", "1024",
                   log_dir=tmp_path_factory.mktemp("spec-stack")) as stack:
        yield stack


def test_a_repetitive_prompt_reaches_a_high_acceptance_rate_with_transformers_tokens(spec_stack, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("Count along: " + ", ".join(["one, two, three, four, five"] * 4) + ",")["input_ids"]
    max_tokens = 32
    spec_stack.wait_idle()
    before = scrape(spec_stack.root_url)
    (output,) = generate_all(spec_stack, [prompt], max_tokens)
    after = scrape(spec_stack.root_url)
    assert output == hf_reference.greedy(model_dir, prompt, max_tokens, ignore_eos=True)
    drafted = delta(after, before, "pagedserve:spec_decode_num_draft_tokens_total")
    accepted = delta(after, before, "pagedserve:spec_decode_num_accepted_tokens_total")
    steps = delta(after, before, "pagedserve:spec_decode_num_drafts_total")
    assert drafted > 0 and accepted / drafted >= 0.7, (accepted, drafted)
    # A good part of the output came from drafts, in few verification steps (16 of 32 in 4 steps
    # when measured; the output moves on from the prompt's pattern after a while).
    assert accepted >= max_tokens / 3 and steps <= accepted / 2
    per_pos = [delta(after, before, "pagedserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
               for i in range(K)]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)

    # Through the OpenAI API with logprobs: every token, accepted drafts included, has its logprob.
    client = OpenAI(base_url=spec_stack.base_url, api_key="none", max_retries=0, timeout=300)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      logprobs=1, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == tokenizer.decode(output)
    logprobs = reply.choices[0].logprobs.token_logprobs
    assert len(logprobs) == max_tokens and all(lp <= 0 for lp in logprobs)
