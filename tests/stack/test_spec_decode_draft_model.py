"""Draft-model speculative decoding through the real processes (`pagedserve serve
--speculative-config '{"method": "draft_model", ...}'`), on a tiny random Llama served as its own
draft (its paged draft KV cache in the worker): greedy drafts are what greedy decoding gives, so
(nearly) every draft is accepted (read from /metrics) and the output is transformers' own; a
seeded sampled request, whose drafts are drawn from the draft's distribution, gives the same
tokens twice."""
from __future__ import annotations

import json

import pytest

from tests.helpers import hf_reference, tiny_models
from tests.helpers.live_stack import delta, scrape
from tests.helpers.stack import generate_all, run_stack

K = 3
PROMPT = [(37 * i + 5) % tiny_models.VOCAB_SIZE for i in range(21)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_models.build("llama", path)
    return path


@pytest.fixture(scope="module")
def draft_stack(tiny_dir, tmp_path_factory):
    spec = json.dumps({"method": "draft_model", "model": str(tiny_dir), "num_speculative_tokens": K})
    with run_stack(tiny_dir, "--speculative-config", spec, "--kv-cache-memory-bytes", str(16 << 20),
                   "--max-model-len", "256", log_dir=tmp_path_factory.mktemp("draft-stack")) as stack:
        yield stack


def test_the_model_as_its_own_draft_is_accepted_with_transformers_tokens(draft_stack, tiny_dir):
    max_tokens = 24
    draft_stack.wait_idle()
    before = scrape(draft_stack.root_url)
    (output,) = generate_all(draft_stack, [PROMPT], max_tokens)
    after = scrape(draft_stack.root_url)
    assert output == hf_reference.greedy(tiny_dir, PROMPT, max_tokens, ignore_eos=True)
    drafted = delta(after, before, "pagedserve:spec_decode_num_draft_tokens_total")
    accepted = delta(after, before, "pagedserve:spec_decode_num_accepted_tokens_total")
    # The same weights on both sides: a draft is refused only where two logits tie to rounding
    # between the batch shapes of the draft's and the target's forward passes.
    assert drafted > 0 and accepted / drafted >= 0.9, (accepted, drafted)


def test_a_seeded_sampled_request_repeats_with_sampled_drafts(draft_stack):
    draft_stack.wait_idle()
    before = scrape(draft_stack.root_url)
    outputs = [draft_stack.generate(PROMPT, 16, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
               for _ in range(2)]
    after = scrape(draft_stack.root_url)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 16
    assert delta(after, before, "pagedserve:spec_decode_num_draft_tokens_total") > 0
