"""A worker SIGKILLed under load, through the real processes (`pagedserve serve`): the scheduler
holds every request in flight, and once the launcher has restarted the worker recomputes each
one's prompt and generated tokens (as after a preemption). Every stream, greedy or seeded, over
gRPC or HTTP, ends exactly as in an undisturbed run: a pause, never an error, a repeated token or
a gap. Workers not back within --resume-timeout fail the requests as before; nothing leaks (shown
on a tiny random Llama served beside it with a 2 s --resume-timeout, so the test does not wait
out SmolLM's 30 s).

The stack runs with --metrics-prefix vllm, as the Kubernetes manifests' engines do (deploy/): its
/metrics carries vLLM's own names, and their values move."""
from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import tiny_models
from tests.helpers.live_stack import children, delta, poll, prompt_ids, scrape, wait_for_child
from tests.helpers.stack import run_stacks

MODEL = "SmolLM2-135M-Instruct"
RESUME_TIMEOUT = 30  # a restarted SmolLM worker is back in ~5 s; a loaded machine takes longer
SHORT_RESUME_TIMEOUT = 2  # the tiny stack's: its worker is never meant to be back in time
MAX_TOKENS = 40
TIMEOUT = 600  # a hang guard, not a bound on speed
GRPC_GREEDY, GRPC_SEEDED, HTTP_GREEDY = 12, 2, 2
METRICS_TOKENS = 120  # long enough to be seen running (and holding KV blocks) by a few scrapes


@pytest.fixture(scope="module")
def stacks(model_dir, tmp_path_factory):
    """SmolLM2 ("smol") and a tiny random Llama with a short --resume-timeout ("tiny"), started
    at once so that their startups overlap."""
    tiny_dir = tmp_path_factory.mktemp("tiny-llama")
    tiny_models.build("llama", tiny_dir, max_position_embeddings=2048)
    servers = {
        "smol": (model_dir, ("--served-model-name", MODEL, "--kv-cache-memory-bytes", str(256 << 20),
                             "--max-model-len", "1024", "--max-num-seqs", "16",
                             "--resume-timeout", str(RESUME_TIMEOUT), "--metrics-prefix", "vllm")),
        "tiny": (tiny_dir, ("--resume-timeout", str(SHORT_RESUME_TIMEOUT), "--num-gpu-blocks-override", "200")),
    }
    with run_stacks(servers, log_dir=tmp_path_factory.mktemp("resume")) as stacks:
        yield stacks


@pytest.fixture(scope="module")
def stack(stacks):
    return stacks["smol"]


@pytest.fixture(scope="module")
def tiny_stack(stacks):
    return stacks["tiny"]


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    topics = ["rivers", "bridges", "markets", "trains", "gardens", "harbours", "libraries", "bells"]
    return [prompt_ids(tokenizer, f"Note {i}: the {topics[i % 8]} of town {i} were built when")
            for i in range(GRPC_GREEDY + GRPC_SEEDED + HTTP_GREEDY)]


class Streams:
    """Every prompt generating at once (12 greedy and 2 seeded over gRPC, 2 greedy over HTTP);
    `counts` holds the tokens each has received so far, `results` each one's token ids (or, over
    HTTP, its text) once all have ended."""

    def __init__(self, stack, prompts):
        self.stack, self.prompts = stack, prompts
        self.counts = [0] * len(prompts)
        self.results: list = []

    def grpc(self, i: int) -> list[int]:
        params = pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
        if i >= GRPC_GREEDY:
            params.temperature, params.seed = 0.8, 1000 + i
        request = pb.GenerateRequest(prompt_token_ids=self.prompts[i], params=params)
        tokens = []
        for reply in self.stack.scheduler.Generate(request, timeout=TIMEOUT):
            tokens.extend(reply.token_ids)
            self.counts[i] = len(tokens)
        return tokens

    def http(self, i: int) -> str:
        body = {"model": MODEL, "prompt": self.prompts[i], "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True}
        text, done = "", False
        with httpx.stream("POST", self.stack.base_url + "/completions", json=body,
                          timeout=TIMEOUT) as reply:
            assert reply.status_code == 200, reply.read()
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["text"]
                    self.counts[i] += 1
                done = done or line == "data: [DONE]"
        assert done, "the stream ended without [DONE]"
        return text

    def run(self, while_running=None) -> list:
        """Starts every stream, calls while_running() once each has its first token, and returns
        every stream's output."""
        n = len(self.prompts)
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(self.grpc if i < GRPC_GREEDY + GRPC_SEEDED else self.http, i)
                       for i in range(n)]
            if while_running is not None:
                poll(lambda: all(self.counts) or any(f.done() for f in futures), TIMEOUT)
                assert not any(f.done() for f in futures), "a stream ended before the kill"
                while_running()
            return [f.result(timeout=TIMEOUT) for f in futures]


def assert_clean(stack) -> None:
    stats = stack.wait_idle()
    assert (stats.kv_blocks_used, stats.num_requests_running, stats.num_requests_waiting) == \
        (0, 0, 0)


def test_with_vllms_metric_prefix_the_vllm_names_are_served_and_move(stack, prompts):
    before = scrape(stack.root_url)
    assert before[("vllm:num_requests_waiting", ())] == 0
    assert not [name for name, _ in before if name.startswith("pagedserve:")
                and name != "pagedserve:num_requests_resumed_total"]
    body = {"model": MODEL, "prompt": prompts[0], "max_tokens": METRICS_TOKENS, "ignore_eos": True,
            "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, stack.base_url + "/completions", json=body,
                              timeout=TIMEOUT)
        poll(lambda: scrape(stack.root_url)[("vllm:num_requests_running", ())] == 1, TIMEOUT)
        usage_perc = scrape(stack.root_url)[("vllm:kv_cache_usage_perc", ())]
        assert 0 < usage_perc < 1
        usage = running.result(timeout=TIMEOUT).json()["usage"]
    after = scrape(stack.root_url)
    assert after[("vllm:num_requests_running", ())] == 0
    assert delta(after, before, "vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(after, before, "vllm:generation_tokens_total") == usage["completion_tokens"] == METRICS_TOKENS
    assert delta(after, before, "vllm:request_success_total", finished_reason="length") == 1
    for name in ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count"):
        assert delta(after, before, name) == 1


def test_16_streams_through_a_killed_worker_end_exactly_as_undisturbed(stack, prompts):
    launcher = stack.proc.pid
    expected = Streams(stack, prompts).run()
    assert all(len(tokens) == MAX_TOKENS for tokens in expected[:GRPC_GREEDY + GRPC_SEEDED])
    before, resumed = children(launcher), stack.stats().num_requests_resumed

    def kill_worker():
        os.kill(before["worker"], signal.SIGKILL)

    got = Streams(stack, prompts).run(kill_worker)
    assert got == expected
    wait_for_child(launcher, "worker", not_pid=before["worker"])
    # Every stream was in flight at the kill (none had ended), and each was resumed.
    assert stack.stats().num_requests_resumed - resumed == len(prompts)
    assert scrape(stack.root_url)[("pagedserve:num_requests_resumed_total", ())] >= len(prompts)
    now = children(launcher)
    assert (now["router"], now["scheduler"]) == (before["router"], before["scheduler"])
    assert_clean(stack)


def test_requests_whose_worker_is_not_back_within_the_resume_timeout_fail_cleanly(tiny_stack):
    """The launcher is stopped (SIGSTOP), so the killed worker stays dead past --resume-timeout:
    the requests held fail with UNAVAILABLE saying so; once the launcher goes on, it restarts
    the worker and the service is whole again."""
    stack = tiny_stack
    launcher = stack.proc.pid
    before = children(launcher)
    prompt = [(13 * i + 5) % tiny_models.VOCAB_SIZE for i in range(20)]
    request = pb.GenerateRequest(prompt_token_ids=prompt, params=pb.SamplingParams(
        max_tokens=2000, ignore_eos=True, temperature=0))
    started, outcome = threading.Event(), {}

    def generate():
        try:
            for _ in stack.scheduler.Generate(request, timeout=TIMEOUT):
                started.set()
        except grpc.RpcError as e:
            outcome["error"] = e

    thread = threading.Thread(target=generate)
    thread.start()
    os.kill(launcher, signal.SIGSTOP)
    try:
        assert started.wait(TIMEOUT)
        os.kill(before["worker"], signal.SIGKILL)
        thread.join(SHORT_RESUME_TIMEOUT + 120)
        assert not thread.is_alive()
    finally:
        os.kill(launcher, signal.SIGCONT)
    error = outcome["error"]
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "--resume-timeout" in error.details(), error.details()
    wait_for_child(launcher, "worker", not_pid=before["worker"])
    poll(lambda: stack.stats().workers_healthy, 240, interval=0.5)
    assert_clean(stack)
    assert len(stack.generate(prompt, 4)) == 4
