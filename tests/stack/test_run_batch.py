"""`pagedserve run-batch` as a user runs it (a real process) on a file in OpenAI's batch format:
its results must be what the HTTP API answers for the same bodies, a line that cannot be sent gets
an error line of its own, and a run killed halfway finishes on a rerun without repeating any id."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pagedserve.entrypoints.healthcheck import http_ok
from tests.helpers.stack import ROOT

MODEL = "SmolLM2-135M-Instruct"
LINES = 200
MALFORMED_LINE = 77  # 1-based, as the error line reports it
# Greedy answers must not hang on a near-tie, where rounding that differs with the batch a request
# lands in picks either token: every greedy step of these prompts was checked with transformers to
# have its top two logits at least 2e-3 apart.
TOPICS = ["rivers", "bread", "the moon", "chess", "rain", "apples", "owls", "glass", "music",
          "salt", "maps", "bees"]


def request_line(i: int) -> dict:
    """Chat and completions mixed, short greedy answers; a few with stop strings, one with a
    token-id prompt, one whose body the server refuses (a result all the same: a 400)."""
    topic = TOPICS[i % len(TOPICS)]
    if i == 150:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 7}
        return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body}
    if i % 2:
        body = {"model": MODEL, "temperature": 0, "max_tokens": 4 + i % 5,
                "messages": [{"role": "user", "content": f"What is {topic}? Answer briefly. ({i})"}]}
        if i % 7 == 0:
            body["stop"] = [" "]
        return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": body}
    prompt = [504, 3575, 282, 4649 + i % 3] if i == 10 else f"Note {i} on {topic}:"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4 + i % 4, "temperature": 0}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body}


def batch_text(count: int, malformed: int | None) -> str:
    lines = [json.dumps(request_line(i)) for i in range(count)]
    if malformed is not None:
        lines[malformed - 1] = '{"custom_id": "req-broken", "method": "POST", "url": '  # cut off
    return "\n".join(lines) + "\n"


def read_results(path) -> list[dict]:
    """The complete lines of an output file (a kill may have torn the last one)."""
    text = path.read_bytes().decode()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def run_batch_command(input_path, output_path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve.entrypoints.cli", "run-batch", "-i", str(input_path),
            "-o", str(output_path), "--disable-progress-bar", *flags]


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "requests.jsonl"
    path.write_text(batch_text(LINES, MALFORMED_LINE))
    return path


@pytest.fixture(scope="module")
def http_answers(smol_stack) -> dict[str, tuple[int, dict]]:
    """custom_id -> (status, body) as the HTTP API answers each request of the file."""
    requests = [request_line(i) for i in range(LINES) if i != MALFORMED_LINE - 1]
    with httpx.Client(base_url=smol_stack.root_url, timeout=300) as client:
        def post(line: dict) -> tuple[str, tuple[int, dict]]:
            reply = client.post(line["url"], json=line["body"])
            return line["custom_id"], (reply.status_code, reply.json())

        with ThreadPoolExecutor(32) as pool:
            return dict(pool.map(post, requests))


def same_answer(body: dict, expected: dict) -> bool:
    """Equal but for what differs between any two calls: ids, timestamps, prefix-cache hits."""
    if "error" in expected:
        return body == expected
    keep = ("object", "model", "choices")
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    return ({k: body[k] for k in keep} == {k: expected[k] for k in keep}
            and {k: body["usage"][k] for k in counts} == {k: expected["usage"][k] for k in counts})


def check_results(results: list[dict], http_answers: dict) -> None:
    answered = [r for r in results if r["error"] is None]
    for record in answered:
        status, expected = http_answers[record["custom_id"]]
        assert record["response"]["status_code"] == status, record["custom_id"]
        assert same_answer(record["response"]["body"], expected), (
            f"{record['custom_id']}: {record['response']['body']} != {expected}")
        assert record["id"].startswith("batch_req_")


def test_killed_run_batch_finishes_on_rerun_with_the_http_api_answers(
        smol_stack, batch_file, http_answers, tmp_path):
    output = tmp_path / "results.jsonl"
    # Few in flight, so results trickle in and the kill lands halfway through the file.
    first = subprocess.Popen(run_batch_command(batch_file, output, "--base-url",
                                               smol_stack.base_url, "--max-concurrency", "8"),
                             cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not output.exists() or output.read_bytes().count(b"\n") < LINES // 2:
        assert first.poll() is None, f"run-batch ended early: {first.stderr.read().decode()}"
        assert time.monotonic() < deadline, "run-batch wrote too few results in time"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    partial = read_results(output)
    assert LINES // 2 <= len(partial) < LINES

    rerun = subprocess.run(run_batch_command(batch_file, output, "--base-url", smol_stack.base_url),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    results = read_results(output)
    assert results[:len(partial)] == partial  # appended to, never rewritten
    ids = [r["custom_id"] for r in results if r["error"] is None]
    assert len(ids) == len(set(ids)) == LINES - 1
    assert set(ids) == set(http_answers)
    errors = [r for r in results if r["error"] is not None]
    assert len(errors) == 1
    assert errors[0]["response"] is None
    assert errors[0]["error"]["code"] == "invalid_json"
    assert errors[0]["error"]["line"] == MALFORMED_LINE
    check_results(results, http_answers)
    refused = next(r for r in results if r["custom_id"] == "req-150")
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["param"] == "temperature"

    again = subprocess.run(run_batch_command(batch_file, output, "--base-url", smol_stack.base_url),
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert read_results(output) == results  # nothing left to do: nothing sent, nothing written


def test_run_batch_starts_and_stops_its_own_server(model_dir, http_answers, tmp_path):
    lines = [request_line(i) for i in range(6)]
    bad = [{"custom_id": "req-0", "method": "POST", "url": "/v1/completions",
            "body": lines[0]["body"]},                                            # repeated id
           {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
           {"method": "POST", "url": "/v1/completions", "body": lines[0]["body"]}]  # no id
    input_path = tmp_path / "requests.jsonl"
    input_path.write_text("".join(json.dumps(x) + "\n" for x in lines + bad))
    output = tmp_path / "results.jsonl"
    done = subprocess.run(run_batch_command(input_path, output, "--model", str(model_dir),
                                            "--served-model-name", MODEL, "--max-num-seqs", "4"),
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    results = read_results(output)
    assert sorted(r["custom_id"] for r in results if r["error"] is None) == \
        sorted(x["custom_id"] for x in lines)
    check_results(results, http_answers)
    errors = {r["error"]["line"]: r for r in results if r["error"] is not None}
    assert {line: r["error"]["code"] for line, r in errors.items()} == {
        7: "duplicate_custom_id", 8: "invalid_url", 9: "missing_custom_id"}
    assert errors[8]["custom_id"] == "wrong-url"

    # The services it started are gone with it.
    root_url = re.search(r"serving \S+ at (http://\S+)/v1 ", done.stderr).group(1)
    assert not http_ok(f"{root_url}/health")
