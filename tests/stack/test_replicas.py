"""Data parallel replicas through real processes on the CPU (`serve --data-parallel-size 2` of a
tiny random Llama): both serve, greedy as transformers does; a multi-turn chat workload with
shared system prompts keeps one replica's prefix-cache hit rate under cache-aware routing and not
under round-robin; a scheduler SIGKILLed under streams loses none of them (the router resumes
each, token for token as the undisturbed run); one replica gone for good leaves the other to
finish everything.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from pagedserve.entrypoints.healthcheck import http_ok
from pagedserve.entrypoints.launcher import free_port
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc
from tests.helpers import hf_reference, tiny_models
from tests.helpers.live_stack import parent_of, poll, scrape
from tests.helpers.sse_client import stream_completion
from tests.helpers.stack import run_stack

TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MODEL = "tiny"
STREAM_TOKENS = 120


def two_free_ports() -> int:
    """A port p with p + 1 free too (replica i's scheduler listens on --grpc-port + i)."""
    while True:
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue


class Replicas:
    def __init__(self, stack, model_dir: Path, template: Path, grpc_port: int):
        self.stack = stack
        self.model_dir = model_dir
        self.template = template
        self.addresses = [f"127.0.0.1:{grpc_port}", f"127.0.0.1:{grpc_port + 1}"]
        self.channels = [grpc.insecure_channel(a) for a in self.addresses]
        self.stubs = [pbgrpc.SchedulerStub(c) for c in self.channels]

    def stats(self, i: int) -> pb.SchedulerStats:
        return self.stubs[i].GetStats(pb.GetStatsRequest(), timeout=10)

    def child(self, role: str, replica: int) -> int:
        """The pid of replica `replica`'s scheduler or worker."""
        launcher = self.stack.proc.pid
        port = self.addresses[replica].rsplit(":", 1)[1]
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or parent_of(int(entry)) != launcher:
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if role == "scheduler" and "pagedserve.scheduler" in argv and port in argv:
                return int(entry)
            if role == "worker" and "pagedserve.worker" in argv:
                own = self.worker_port(replica)
                if own is not None and own in argv:
                    return int(entry)
        raise AssertionError(f"no {role} of replica {replica}")

    def worker_port(self, replica: int) -> str | None:
        """The port of replica's worker, from its scheduler's --worker-addrs."""
        pid = self.child("scheduler", replica)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        return argv[argv.index("--worker-addrs") + 1].rsplit(":", 1)[1]

    def wait_healthy(self, timeout: float = 120) -> None:
        def healthy():
            try:
                return all(self.stats(i).workers_healthy for i in range(2))
            except grpc.RpcError:
                return False
        poll(healthy, timeout, interval=0.5)
        # ...and the router has seen both again (it checks every second).
        poll(lambda: scrape(self.stack.root_url).get(
            ("pagedserve_router_healthy_replicas", ())) == 2.0, 30, interval=0.5)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    tiny_models.build("llama", model_dir, max_position_embeddings=1024)  # room for the chats
    template = model_dir / "chat.jinja"
    template.write_text(TEMPLATE)
    grpc_port = two_free_ports()
    with run_stack(model_dir, "--data-parallel-size", "2", "--grpc-port", str(grpc_port),
                   "--served-model-name", MODEL, "--chat-template", str(template),
                   "--resume-timeout", "60", log_dir=tmp_path_factory.mktemp("replicas")) as stack:
        r = Replicas(stack, model_dir, template, grpc_port)
        r.wait_healthy()
        yield r
        for c in r.channels:
            c.close()


def words(rng: random.Random, n: int) -> str:
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    return " ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(n))


def test_two_replicas_both_serve_greedy_as_transformers_does(replicas):
    tok = tiny_models.tokenizer()
    rng = random.Random(1)
    prompts = [tok(words(rng, 12), add_special_tokens=False)["input_ids"] for _ in range(6)]
    before = [replicas.stats(i).prompt_tokens_total for i in range(2)]

    def complete(prompt):
        reply = httpx.post(replicas.stack.base_url + "/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 0})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(complete, prompts))
    for prompt, text in zip(prompts, texts):
        expected = hf_reference.greedy(replicas.model_dir, prompt, 8, ignore_eos=True)
        # The router never shows half a character: an unfinished one at the end is left out.
        assert text == tok.decode(expected).rstrip("\ufffd")
    after = [replicas.stats(i).prompt_tokens_total for i in range(2)]
    assert all(a > b for a, b in zip(after, before)), (before, after)  # both took some


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0, "ignore_eos": True},
    {"temperature": 1.0, "seed": 11, "ignore_eos": True},
    # EOS banned before 20 tokens (min_tokens), then free to end the output early
    {"temperature": 0.8, "seed": 5, "top_k": 50, "presence_penalty": 1.5,
     "repetition_penalty": 1.3, "min_tokens": 20},
], ids=["greedy", "seeded", "seeded-penalties-min-tokens"])
def test_a_grpc_continuation_goes_on_as_the_undisturbed_run(replicas, sampling):
    """GenerateRequest.resume_output_token_ids on a real worker: the rest of the output is the
    undisturbed run's, with the seeded sampler, the penalties and min_tokens seeing the resumed
    tokens as its own."""
    stub = replicas.stubs[1]
    prompt = tiny_models.tokenizer()(words(random.Random(3), 8), add_special_tokens=False)["input_ids"]
    params = pb.SamplingParams(max_tokens=24, **sampling)

    def generate(resumed=()):
        request = pb.GenerateRequest(prompt_token_ids=prompt, params=params,
                                     resume_output_token_ids=resumed)
        replies = list(stub.Generate(request, timeout=120))
        return [t for r in replies for t in r.token_ids], replies[-1]

    whole, end = generate()
    assert 20 <= len(whole) <= 24 and end.completion_tokens == len(whole)
    for cut in (1, 9, 19):
        rest, last = generate(whole[:cut])
        assert rest == whole[cut:], cut
        assert (last.completion_tokens, last.finish_reason) == (len(whole), end.finish_reason)
        assert last.prompt_tokens == len(prompt)


def test_the_offline_llm_spreads_over_data_parallel_replicas(replicas):
    from pagedserve import LLM, SamplingParams
    tok = tiny_models.tokenizer()
    rng = random.Random(2)
    prompts = [tok(words(rng, 10), add_special_tokens=False)["input_ids"] for _ in range(6)]
    with LLM(str(replicas.model_dir), data_parallel_size=2, max_num_seqs=4) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        stats = [pbgrpc.SchedulerStub(grpc.insecure_channel(a)).GetStats(pb.GetStatsRequest(),
                                                                          timeout=10)
                 for a in llm._server.grpc_addresses]
    for prompt, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == hf_reference.greedy(
            replicas.model_dir, prompt, 6, ignore_eos=True)
    assert all(s.prompt_tokens_total > 0 for s in stats)  # both replicas served some


# ----- routing and the prefix cache -----------------------------------------------------------------

def start_router(replicas, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-P", "-m", "pagedserve.router", "--model", str(replicas.model_dir),
           "--served-model-name", MODEL, "--chat-template", str(replicas.template),
           "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    poll(lambda: http_ok(url + "/health") or proc.poll() is not None, 120, interval=0.3)
    assert proc.poll() is None
    return proc, url


def chat_workload(url: str, seed: int, conversations=8, turns=4) -> None:
    """Multi-turn chats, two system prompts shared among them, each conversation's turns in
    order (its next prompt holds the last one and the reply), one request at a time: side by
    side, the order in which the chats' turns reached round robin was chance, and so was its hit
    rate (a chat whose turns all landed on one replica hit as under cache_aware)."""
    rng = random.Random(seed)
    systems = [words(rng, 24), words(rng, 24)]
    users = [[words(rng, 16) for _ in range(turns)] for _ in range(conversations)]

    def converse(c: int) -> None:
        messages = [{"role": "system", "content": systems[c % 2]}]
        for turn in range(turns):
            messages.append({"role": "user", "content": users[c][turn]})
            reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            messages.append({"role": "assistant",
                             "content": reply.json()["choices"][0]["message"]["content"]})

    for c in range(conversations):
        converse(c)


def hit_rate(replicas, run) -> float:
    """The prefix cache's hit rate (hits / queries, over both schedulers) during run()."""
    before = [replicas.stats(i) for i in range(2)]
    run()
    after = [replicas.stats(i) for i in range(2)]
    hits = sum(a.prefix_cache_hits - b.prefix_cache_hits for a, b in zip(after, before))
    queries = sum(a.prefix_cache_queries - b.prefix_cache_queries for a, b in zip(after, before))
    return hits / queries


def test_cache_aware_routing_keeps_one_replicas_hit_rate_and_round_robin_does_not(replicas):
    """Each run has system prompts and messages of its own: no run finds another's prefixes."""
    both = ",".join(replicas.addresses)
    routers = {"one replica": ("--scheduler-addr", replicas.addresses[0]),
               "cache_aware": ("--scheduler-addrs", both, "--routing-policy", "cache_aware"),
               "round_robin": ("--scheduler-addrs", both, "--routing-policy", "round_robin")}
    rates = {}
    for seed, (name, flags) in enumerate(routers.items()):
        proc, url = start_router(replicas, *flags)
        try:
            rates[name] = hit_rate(replicas, lambda: chat_workload(url, seed + 100))
        finally:
            proc.terminate()
            proc.wait(30)
    print("prefix cache hit rates:", {k: round(v, 3) for k, v in rates.items()})
    assert rates["cache_aware"] >= rates["one replica"] - 0.05
    assert rates["round_robin"] < rates["cache_aware"] - 0.1


# ----- a scheduler killed under streams ---------------------------------------------------------------

def stream_requests() -> list[dict]:
    tok = tiny_models.tokenizer()
    rng = random.Random(7)
    bodies = []
    for i in range(8):
        prompt = tok(words(rng, 10), add_special_tokens=False)["input_ids"]
        sampling = {"temperature": 0} if i < 6 else {"temperature": 1.0, "seed": 40 + i}
        bodies.append({"model": MODEL, "prompt": prompt, "max_tokens": STREAM_TOKENS,
                       "ignore_eos": True, "stream": True, "logprobs": 0,
                       "stream_options": {"include_usage": True}, **sampling})
    return bodies


def run_streams(url: str, bodies: list[dict], when_started=None) -> list[tuple]:
    """Every stream's (token strings, text, completion_tokens, errors); when_started() is called
    once every stream has had 3 chunks."""
    started = threading.Barrier(len(bodies), action=when_started) if when_started else None

    def one(body):
        def on_chunk(chunks: int):
            if started is not None and chunks == 3:
                started.wait(120)
        got = stream_completion(url, body, on_chunk)
        return got.tokens, got.text, got.completion_tokens, got.errors

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def resumptions(replicas) -> float:
    return scrape(replicas.stack.root_url).get(("pagedserve_router_request_resumptions_total", ()), 0.0)


def test_a_scheduler_killed_under_streams_loses_none_of_them(replicas):
    bodies = stream_requests()
    expected = run_streams(replicas.stack.root_url, bodies)
    assert all(e[2] == STREAM_TOKENS and not e[3] for e in expected)
    victim = replicas.child("scheduler", 0)
    before = resumptions(replicas)
    got = run_streams(replicas.stack.root_url, bodies,
                      when_started=lambda: os.kill(victim, signal.SIGKILL))
    assert got == expected  # greedy and seeded: the same tokens, no error, no gap, no repeat
    assert resumptions(replicas) > before  # the kill did land mid-stream
    assert "replica 0 scheduler exited with code -9; restarting" in replicas.stack.log()
    replicas.wait_healthy()


def test_one_replica_gone_for_good_leaves_the_other_to_finish_everything(replicas):
    stack = replicas.stack
    bodies = stream_requests()
    expected = run_streams(stack.root_url, bodies)
    doomed = [replicas.child("scheduler", 1), replicas.child("worker", 1)]
    os.kill(stack.proc.pid, signal.SIGSTOP)  # no restart: the replica stays gone
    try:
        got = run_streams(stack.root_url, bodies,
                          when_started=lambda: [os.kill(p, signal.SIGKILL) for p in doomed])
        assert got == expected
        poll(lambda: scrape(stack.root_url).get(("pagedserve_router_healthy_replicas", ())) == 1.0,
             30)
        # New requests all go to the one replica left, and all succeed.
        served = replicas.stats(0).num_steps
        assert run_streams(stack.root_url, bodies[:4]) == expected[:4]
        assert replicas.stats(0).num_steps > served
        assert httpx.get(stack.root_url + "/health", timeout=10).status_code == 200
    finally:
        os.kill(stack.proc.pid, signal.SIGCONT)
    replicas.wait_healthy()
