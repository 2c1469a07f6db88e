"""vLLM's request extras on the live stack (router, scheduler, worker over gRPC, the real openai
SDK), each judged by its effect on what SmolLM2 generates, with transformers as the reference:
continue_final_message, include_stop_str_in_output, allowed_token_ids, bad_words,
truncate_prompt_tokens, and text cut inside a character."""
from __future__ import annotations

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from tests import hf_reference

MODEL = "SmolLM2-135M-Instruct"
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def client(smol_stack):
    return OpenAI(base_url=smol_stack.base_url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def complete(client, prompt, **extra):
    kw = {k: extra.pop(k) for k in ("max_tokens", "stop", "logprobs", "stream") if k in extra}
    kw.setdefault("max_tokens", 8)
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body=extra,
                                     **kw)


def contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_continue_final_message_continues_the_assistant_text(client, tokenizer, model_dir):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    prompt_ids = tokenizer.apply_chat_template(messages, continue_final_message=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    expected = hf_reference.greedy(model_dir, prompt_ids, 8)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.choices[0].message.content.startswith(" Paris")


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    prompt = "Here is the English alphabet: ABC"
    full = complete(client, prompt, max_tokens=12).choices[0].text
    assert "G" in full, "the test needs the model to write past G"
    cut = complete(client, prompt, max_tokens=12, stop=["G"])
    kept = complete(client, prompt, max_tokens=12, stop=["G"], include_stop_str_in_output=True)
    assert cut.choices[0].text == full[:full.index("G")]
    assert kept.choices[0].text == full[:full.index("G") + 1]
    assert kept.choices[0].finish_reason == "stop"
    streamed = complete(client, prompt, max_tokens=12, stop=["G"], include_stop_str_in_output=True,
                        stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == kept.choices[0].text


def test_allowed_token_ids_restrict_greedy_to_them(client, tokenizer, model_dir):
    prompt = "The capital of France is"
    words = [" Paris", " London", " the", " a", ".", ",", " and", " city", " of", " France"]
    allowed = sorted({t for w in words for t in tokenizer(w, add_special_tokens=False)["input_ids"]})
    reply = complete(client, prompt, max_tokens=8, logprobs=0, allowed_token_ids=allowed,
                     return_tokens_as_token_ids=True, ignore_eos=True)
    got = [int(t.split(":")[1]) for t in reply.choices[0].logprobs.tokens]
    assert set(got) <= set(allowed)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert got == hf_reference.constrained_greedy(model_dir, prompt_ids, 8, allowed=allowed)


def test_bad_words_never_appear_and_greedy_takes_the_next_best(client, tokenizer, model_dir):
    prompt = "The capital of France is"
    free = complete(client, prompt, max_tokens=8, ignore_eos=True).choices[0].text
    word = "Paris"
    assert word in free, "the test needs the unconstrained answer to hold the word"
    reply = complete(client, prompt, max_tokens=8, logprobs=0, bad_words=[word],
                     return_tokens_as_token_ids=True, ignore_eos=True)
    got = [int(t.split(":")[1]) for t in reply.choices[0].logprobs.tokens]
    banned = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (word, " " + word)]
    assert not any(contains(got, b) for b in banned)
    assert word not in reply.choices[0].text

    def forbidden(output):  # vLLM's rule, independently written
        return {b[-1] for b in banned if output[len(output) - len(b) + 1:] == b[:-1]
                or len(b) == 1}

    prompt_ids = tokenizer(prompt)["input_ids"]
    assert got == hf_reference.constrained_greedy(model_dir, prompt_ids, 8, forbidden=forbidden)


def test_truncate_prompt_tokens_equals_sending_the_last_tokens(client, tokenizer):
    prompt = "Rivers, bridges and old streets: the history of the city of Lyon begins"
    ids = tokenizer(prompt)["input_ids"]
    cut = complete(client, prompt, truncate_prompt_tokens=6, ignore_eos=True)
    assert cut.usage.prompt_tokens == 6
    assert cut.choices[0].text == complete(client, ids[-6:], ignore_eos=True).choices[0].text


def test_a_generation_cut_inside_an_emoji_ends_on_a_whole_character(client, tokenizer):
    messages = [{"role": "user", "content": "Write a four-line poem in Chinese about the moon, "
                 "with a moon emoji 🌙 at the end of every line."}]
    probe = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=60, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    ids = [int(e.token.split(":")[1]) for e in probe.choices[0].logprobs.content]
    cuts = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, "the test needs the answer to hold a character split over tokens"
    k = cuts[0]
    expected = tokenizer.decode(ids[:k]).rstrip("\ufffd")
    kw = dict(model=MODEL, messages=messages, temperature=0, max_tokens=k, logprobs=True)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content == expected
    assert len(whole.choices[0].logprobs.content) == k  # every token keeps its logprob
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kw, stream=True) if c.choices)
    assert streamed == expected and "\ufffd" not in streamed
