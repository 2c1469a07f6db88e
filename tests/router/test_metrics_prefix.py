"""--metrics-prefix vllm: the router's /metrics carries vLLM's own names (vllm:...), so routers and
autoscalers written for vLLM (llm-d's endpoint picker, vLLM's production stack, KEDA on
vllm:num_requests_waiting) read a pagedserve replica as they read vLLM. pagedserve's own metrics,
which vLLM has no name for, keep `pagedserve:`. (The values moving on a real stack:
tests/stack/test_resume.py.)"""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.router.metrics import Metrics
from tests.helpers.router_fixtures import say

# vLLM's names (vllm/v1/metrics/loggers.py), as the families' names (counters without _total).
VLLM_FAMILIES = {
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
    "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
    "generation_tokens", "time_to_first_token_seconds", "inter_token_latency_seconds",
    "e2e_request_latency_seconds", "request_success",
}


def families(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(family, suffix: str = "", **labels) -> float:
    return next(s.value for s in family.samples if s.name == family.name + suffix
                and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("prefix", ["pagedserve", "vllm"])
def test_vllms_names_are_under_the_prefix_and_pagedserves_own_keep_theirs(harness, prefix):
    found = families(harness.router(metrics_prefix=prefix).url)
    model = {name.split(":", 1)[1] for name in found if name.startswith(prefix + ":")}
    assert VLLM_FAMILIES <= model
    other = "vllm" if prefix == "pagedserve" else "pagedserve"
    assert {name for name in found if name.startswith(other + ":")} <= \
        ({"pagedserve:num_requests_resumed"} if other == "pagedserve" else set())
    assert "pagedserve:num_requests_resumed" in found  # no vLLM name: always pagedserve's


def test_with_vllms_prefix_the_request_metrics_move(harness, fake, tokenizer):
    router = harness.router(metrics_prefix="vllm")
    before = families(router.url)
    say(fake, tokenizer, "Hello there")
    reply = httpx.post(router.url + "/v1/chat/completions", timeout=30, json={
        "model": "smol", "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    after = families(router.url)
    success = "vllm:request_success"
    assert sample(after[success], "_total", finished_reason="stop") == \
        sample(before[success], "_total", finished_reason="stop") + 1
    for name in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds"):
        assert sample(after[name], "_count") == sample(before[name], "_count") + 1


def test_an_unknown_prefix_is_refused():
    with pytest.raises(ValueError, match="metrics_prefix"):
        Metrics("sglang")


@pytest.mark.parametrize("prefix", ["pagedserve", "vllm"])
def test_every_spec_decode_counter_is_under_the_prefix(prefix):
    # vLLM names all four (vllm:spec_decode_num_accepted_tokens_per_pos too): none may keep
    # pagedserve: under --metrics-prefix vllm (a new user found the per-position one did)
    from prometheus_client import generate_latest

    from pagedserve.v1 import scheduler_pb2 as pb
    metrics = Metrics(prefix)
    metrics.bind("smol")
    metrics.scheduler.stats = pb.SchedulerStats(
        spec_decode_num_drafts=3, spec_decode_num_draft_tokens=12, spec_decode_num_accepted_tokens=7,
        spec_decode_num_accepted_tokens_per_pos=[3, 2, 1, 1])
    found = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    spec = {name for name in found if "spec_decode" in name}
    assert spec == {f"{prefix}:spec_decode_{n}" for n in (
        "num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")}
    per_pos = found[f"{prefix}:spec_decode_num_accepted_tokens_per_pos"]
    assert [sample(per_pos, "_total", position=str(i)) for i in range(4)] == [3, 2, 1, 1]
