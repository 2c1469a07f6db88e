"""Draft-model speculative decoding through the real processes (`pagedserve serve
--speculative-config '{"method": "draft_model", ...}'`): the served model as its own draft proposes
exactly what greedy decoding would, so (nearly) every draft is accepted (read from /metrics), and
the greedy output is transformers' own."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.helpers import hf_reference
from tests.helpers.live_stack import delta, scrape
from tests.helpers.stack import generate_all, run_stack

K = 3


@pytest.fixture(scope="module")
def draft_stack(model_dir, tmp_path_factory):
    spec = json.dumps({"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": K})
    with run_stack(model_dir, "--speculative-config", spec, "--kv-cache-memory-bytes", str(128 << 20),
                   "--max-model-len", "1024", log_dir=tmp_path_factory.mktemp("draft-stack")) as stack:
        yield stack


def test_the_model_as_its_own_draft_is_accepted_with_transformers_tokens(draft_stack, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("The history of the printing press begins")["input_ids"]
    max_tokens = 24
    draft_stack.wait_idle()
    before = scrape(draft_stack.root_url)
    (output,) = generate_all(draft_stack, [prompt], max_tokens)
    after = scrape(draft_stack.root_url)
    assert output == hf_reference.greedy(model_dir, prompt, max_tokens, ignore_eos=True)
    drafted = delta(after, before, "pagedserve:spec_decode_num_draft_tokens_total")
    accepted = delta(after, before, "pagedserve:spec_decode_num_accepted_tokens_total")
    # The same weights on both sides: a draft is refused only where two logits tie to rounding
    # between transformers' forward and the worker's kernels.
    assert drafted > 0 and accepted / drafted >= 0.9, (accepted, drafted)
