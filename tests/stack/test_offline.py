"""The offline API, `from pagedserve import LLM, SamplingParams`: it starts the worker and the
scheduler itself (no router: its front end runs in this process), returns one output per prompt in
the order of the prompts, each the HTTP API's answer to the same request, with the generated token
ids (judged by transformers), and stops the services on close."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import os

import httpx
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.healthcheck import grpc_serving
from tests.helpers import hf_reference
from tests.helpers.live_stack import children

MODEL = "SmolLM2-135M-Instruct"
# As in test_batch: no greedy step of these prompts is a near-tie (top two logits within 2e-3, as
# transformers computes them), which rounding that differs with the batch could decide either way.
SUBJECTS = ["a lighthouse", "the desert", "a violin", "old bridges", "winter", "a garden",
            "the harbor", "a library", "mountains", "the market"]


def prompt(i: int) -> str:
    return f"Question {i}: where is {SUBJECTS[i % len(SUBJECTS)]}?\nAnswer:"


def max_tokens(i: int) -> int:
    return 3 + i % 6  # lengths that differ from prompt to prompt: a reordering shows


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), served_model_name=MODEL, max_num_seqs=16) as llm:
        yield llm


@pytest.fixture(scope="module")
def http(smol_stack):
    # A fresh connection per request: between a module's requests the offline LLM can run longer
    # than uvicorn keeps an idle connection (5 s), and a request sent as it closes one is reset.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=smol_stack.base_url, timeout=300, limits=limits) as client:
        yield client


def post_all(http: httpx.Client, path: str, bodies: list[dict]) -> list[dict]:
    def post(body: dict) -> dict:
        reply = http.post(path, json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(post, bodies))


def test_generate_50_prompts_in_order_as_the_http_api_answers(llm, http, model_dir):
    prompts = [prompt(i) for i in range(50)]
    params = [SamplingParams(temperature=0, max_tokens=max_tokens(i)) for i in range(50)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    answers = post_all(http, "/completions", [
        {"model": MODEL, "prompt": p, "temperature": 0, "max_tokens": max_tokens(i)}
        for i, p in enumerate(prompts)])

    assert [o.prompt for o in outputs] == prompts
    for i, (output, answer) in enumerate(zip(outputs, answers)):
        (completion,), (choice,) = output.outputs, answer["choices"]
        assert completion.text == choice["text"], f"prompt {i}"
        assert completion.finish_reason == choice["finish_reason"], f"prompt {i}"
        assert len(completion.token_ids) == answer["usage"]["completion_tokens"], f"prompt {i}"
        assert len(output.prompt_token_ids) == answer["usage"]["prompt_tokens"], f"prompt {i}"
    for output in outputs[:3]:  # the ids themselves, which the HTTP API does not show
        expected = hf_reference.greedy(model_dir, output.prompt_token_ids,
                                       len(output.outputs[0].token_ids))
        assert output.outputs[0].token_ids == expected


def test_chat_as_the_http_api_answers(llm, http):
    chats = [[{"role": "user", "content": f"Name a color that {s} makes you think of."}]
             for s in SUBJECTS[:6]]
    params = SamplingParams(temperature=0, max_tokens=8, stop=["."], logprobs=1)
    outputs = llm.chat(chats, params, use_tqdm=False)
    answers = post_all(http, "/chat/completions", [
        {"model": MODEL, "messages": c, "temperature": 0, "max_tokens": 8, "stop": ["."]}
        for c in chats])
    for output, answer in zip(outputs, answers):
        (completion,), (choice,) = output.outputs, answer["choices"]
        assert completion.text == choice["message"]["content"]
        assert completion.finish_reason == choice["finish_reason"]
        assert len(completion.token_ids) == answer["usage"]["completion_tokens"]
        assert output.prompt.endswith("<|im_start|>assistant\n")  # the template's rendering
        # logprobs=1: the sampled token's (greedy: the best) and one alternative per token
        assert len(completion.logprobs) == len(completion.token_ids)
        for token_id, alternatives in zip(completion.token_ids, completion.logprobs):
            assert max(alternatives, key=alternatives.get) == token_id
        sampled = [lp[t] for t, lp in zip(completion.token_ids, completion.logprobs)]
        assert completion.cumulative_logprob == pytest.approx(sum(sampled), abs=1e-6)
        # vLLM's stop_reason: the stop string that ended the text; None when EOS or length did
        ended_by_stop = "." in llm.get_tokenizer().decode(completion.token_ids)
        assert completion.stop_reason == ("." if ended_by_stop else None)


def test_prompt_logprobs_equal_transformers(llm, model_dir):
    [output] = llm.generate(["The capital of France is Paris."], SamplingParams(
        temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    ids = output.prompt_token_ids
    with torch.inference_mode():
        logits = hf_reference.load(str(model_dir))(torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(ids)
    for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
        row = expected[position - 1]
        assert set(entry) == {ids[position], *row.topk(2).indices.tolist()}
        assert all(abs(v - row[t].item()) < 1e-3 for t, v in entry.items()), f"position {position}"


def test_bad_sampling_params_raise_before_anything_runs(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(["a fine prompt", "another"], SamplingParams(temperature=9))
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])


def test_only_the_worker_and_the_scheduler_are_started(llm):
    """Its children (this process's: the launcher runs in it) are one worker and the scheduler;
    the shared HTTP stack's processes are the children of its own launcher, not ours."""
    assert sorted(children(os.getpid())) == ["scheduler", "worker"]


def test_close_stops_the_services(llm):
    address = llm._server.grpc_address
    pids = children(os.getpid())
    assert grpc_serving(address) and sorted(pids) == ["scheduler", "worker"]
    llm.close()
    assert not grpc_serving(address)
    assert children(os.getpid()) == {}
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("too late")
