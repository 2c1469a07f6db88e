"""Prompt logprobs through the real processes, judged by transformers' log_softmax on the same
weights (fp32 on both sides): completions `echo` + `logprobs` (what lm-evaluation-harness sends),
`max_tokens: 0` with echo, vLLM's `prompt_logprobs` for completions and chat, and the public gRPC
API's num_prompt_logprobs; with a prefix cache hit available, the positions are still computed."""
from __future__ import annotations

import httpx
import torch

from pagedserve.v1 import scheduler_pb2 as pb
from tests.helpers import hf_reference

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is Paris, and the capital of Italy is Rome."
TOLERANCE = 1e-3  # fp32


def hf_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the distribution of ids[i + 1] given ids[:i + 1]."""
    model = hf_reference.load(str(model_dir))
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def echo(client, prompt=PROMPT, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, echo=True, temperature=0, **kw)


def test_echo_logprobs_equal_transformers(client, tokenizer, model_dir):
    ids = tokenizer(PROMPT)["input_ids"]
    expected = hf_logprobs(model_dir, ids)
    choice = echo(client, logprobs=2, max_tokens=1).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT)
    assert len(lp.tokens) == len(ids) + 1  # the prompt, then the generated token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    for i in range(1, len(ids)):
        row = expected[i - 1]
        assert abs(lp.token_logprobs[i] - row[ids[i]].item()) < TOLERANCE, f"position {i}"
        top_ids = row.topk(2).indices.tolist()
        wanted = {tokenizer.decode([t]) for t in [ids[i], *top_ids]}
        assert set(lp.top_logprobs[i]) == wanted, f"position {i}"
        assert choice.text[lp.text_offset[i]:].startswith(lp.tokens[i]), f"position {i}"


def test_echo_with_max_tokens_zero_returns_the_prompt_alone(client, tokenizer, model_dir):
    ids = tokenizer(PROMPT)["input_ids"]
    reply = echo(client, logprobs=0, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.token_logprobs) == len(ids)
    expected = hf_logprobs(model_dir, ids)
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    assert torch.allclose(got, expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=TOLERANCE)


def test_max_tokens_zero_without_echo_is_refused_by_name(smol_stack):
    reply = httpx.post(smol_stack.base_url + "/completions", timeout=60,
                       json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_logprobs_equal_the_whole_answer(client):
    whole = echo(client, logprobs=1, max_tokens=3).choices[0]
    text, token_logprobs = "", []
    for chunk in echo(client, logprobs=1, max_tokens=3, stream=True):
        for choice in chunk.choices:
            text += choice.text
            token_logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
    assert text == whole.text
    assert token_logprobs == whole.logprobs.token_logprobs


def check_vllm_shape(prompt_logprobs: list, ids: list[int], expected: torch.Tensor, k: int, tokenizer):
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        row, entry = expected[i - 1], prompt_logprobs[i]
        own = entry[str(ids[i])]
        assert abs(own["logprob"] - row[ids[i]].item()) < TOLERANCE, f"position {i}"
        assert own["rank"] == int((row >= row[ids[i]]).sum()), f"position {i}"
        assert own["decoded_token"] == tokenizer.decode([ids[i]])
        for rank, token in enumerate(row.topk(k).indices.tolist(), start=1):
            if token != ids[i]:
                assert entry[str(token)]["rank"] == rank, f"position {i}"
        assert len(entry) in (k, k + 1)


def test_vllm_prompt_logprobs_for_completions(client, tokenizer, model_dir):
    ids = tokenizer(PROMPT)["input_ids"]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"prompt_logprobs": 3})
    choice = reply.model_dump()["choices"][0]
    assert choice["logprobs"] is None  # prompt_logprobs alone asks nothing of the output
    check_vllm_shape(choice["prompt_logprobs"], ids, hf_logprobs(model_dir, ids), 3, tokenizer)


def test_vllm_prompt_logprobs_for_chat(client, tokenizer, model_dir):
    messages = [{"role": "user", "content": "Name the capital of France."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                           extra_body={"prompt_logprobs": 1})
    check_vllm_shape(reply.model_dump()["prompt_logprobs"], ids, hf_logprobs(model_dir, ids), 1, tokenizer)


def test_prompt_logprobs_with_stream_is_refused_by_name(smol_stack):
    reply = httpx.post(smol_stack.base_url + "/completions", timeout=60,
                       json={"model": MODEL, "prompt": PROMPT, "prompt_logprobs": 1, "stream": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt_logprobs"


def test_prefix_cached_prompt_is_computed_again_for_its_logprobs(client, smol_stack, tokenizer, model_dir):
    prompt = "A long shared preamble that fills several KV cache blocks. " * 4 + "Then a question?"
    ids = tokenizer(prompt)["input_ids"]
    warm = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0, "the prompt is in the prefix cache"
    assert warm.choices[0].text == again.choices[0].text
    reply = echo(client, prompt, logprobs=0, max_tokens=0)
    assert reply.usage.prompt_tokens_details is None, "no cache hit taken for the wanted positions"
    expected = hf_logprobs(model_dir, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor(reply.choices[0].logprobs.token_logprobs[1:])
    assert torch.allclose(got, expected, atol=TOLERANCE)
    assert smol_stack.wait_idle().kv_blocks_used == 0


def test_grpc_num_prompt_logprobs(smol_stack, tokenizer, model_dir):
    ids = tokenizer(PROMPT)["input_ids"]
    request = pb.GenerateRequest(prompt_token_ids=ids, params=pb.SamplingParams(
        temperature=0, max_tokens=3, n=2, num_prompt_logprobs=2))
    replies = list(smol_stack.scheduler.Generate(request, timeout=300))
    assert [len(r.prompt_logprobs) for r in replies].count(len(ids) - 1) == 1
    assert not any(r.prompt_logprobs for r in replies[1:]), "the first message carries them"
    expected = hf_logprobs(model_dir, ids)
    for i, entry in enumerate(replies[0].prompt_logprobs, start=1):
        assert entry.token_id == ids[i]
        assert abs(entry.logprob - expected[i - 1, ids[i]].item()) < TOLERANCE
        assert [t.token_id for t in entry.top] == expected[i - 1].topk(2).indices.tolist()


def test_logprobs_keep_the_stop_token_that_the_text_hides(client, tokenizer):
    """lm-eval drops the last echoed entry as the generated token: when that token is EOS it
    must still be there (as vLLM's), or lm-eval would drop a prompt token's logprob instead."""
    prompt = "Question: What is two plus two?\nAnswer: twenty-two"
    reply = echo(client, prompt, logprobs=1, max_tokens=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.text == prompt  # greedy: EOS comes next
    assert len(choice.logprobs.tokens) == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.logprobs.tokens[-1] == tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
