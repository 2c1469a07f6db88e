"""The OpenAI API through the real processes (router, scheduler, worker over gRPC), with the real
openai SDK: each parameter is checked by its effect on what the model generates, and transformers
is the judge of greedy tokens and logprobs."""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.helpers import hf_reference

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The history of the city of Lyon begins"
REPETITIVE = "one two one two one two one two one two one two one two"


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def greedy_ids(smol_stack, prompt_ids):
    return smol_stack.generate(prompt_ids, 16, ignore_eos=True)


def complete(client, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    extra = {k: kw.pop(k) for k in ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                                    "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
                                    "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
                                    "return_tokens_as_token_ids") if k in kw}
    return client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **kw)


def chat(client, content, **kw):
    kw.setdefault("temperature", 0)
    extra = {k: kw.pop(k) for k in ("min_tokens", "ignore_eos", "skip_special_tokens") if k in kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          extra_body=extra, **kw)


def token_counts(usage) -> tuple[int, int, int]:
    """Usage without prompt_tokens_details: its cached_tokens rightly grow as the prefix cache warms."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def most_repeats(tokenizer, text: str) -> int:
    return max(Counter(tokenizer(text, add_special_tokens=False)["input_ids"]).values())


# ----- the greedy text is transformers' -------------------------------------------------------

def test_greedy_completion_is_transformers_and_max_tokens_ends_with_length(client, tokenizer, model_dir, prompt_ids, greedy_ids):
    assert greedy_ids == hf_reference.greedy(model_dir, prompt_ids, 16, ignore_eos=True)
    reply = complete(client, max_tokens=5, ignore_eos=True)
    assert reply.choices[0].text == tokenizer.decode(greedy_ids[:5])
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), 5)


def test_prompt_forms_give_the_same_greedy_text(client, tokenizer, prompt_ids, greedy_ids):
    other = "Rivers and bridges"
    text = tokenizer.decode(greedy_ids[:8])
    as_ids = complete(client, prompt=prompt_ids, max_tokens=8, ignore_eos=True)
    assert as_ids.choices[0].text == text
    several = complete(client, prompt=[PROMPT, other], max_tokens=8, ignore_eos=True)
    several_ids = complete(client, prompt=[prompt_ids, tokenizer(other)["input_ids"]], max_tokens=8, ignore_eos=True)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == text
    assert [c.text for c in several.choices] == [c.text for c in several_ids.choices]
    assert several.usage.completion_tokens == 16


def test_echo_prepends_the_prompt(client, tokenizer, greedy_ids):
    reply = complete(client, max_tokens=4, echo=True, ignore_eos=True)
    assert reply.choices[0].text == PROMPT + tokenizer.decode(greedy_ids[:4])


# ----- stopping -------------------------------------------------------------------------------

def test_stop_string_cuts_the_text_before_it(client, tokenizer, greedy_ids):
    full = tokenizer.decode(greedy_ids)
    word = full.split()[3]
    reply = complete(client, stop=[word, "@@never@@"], ignore_eos=True)
    assert reply.choices[0].text == full[:full.index(word)]
    assert reply.choices[0].finish_reason == "stop"
    assert word not in reply.choices[0].text


def test_stop_token_ids_end_the_generation_there(client, tokenizer, greedy_ids):
    stop_at = next(i for i in range(3, 16) if greedy_ids[i] not in greedy_ids[:i])
    reply = complete(client, stop_token_ids=[greedy_ids[stop_at]], ignore_eos=True)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == tokenizer.decode(greedy_ids[:stop_at])
    assert reply.usage.completion_tokens == stop_at + 1  # the stop token is generated, not shown


def test_min_tokens_ignore_eos_and_special_tokens(client):
    short = chat(client, "Say OK.", max_tokens=60)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 30
    longer = chat(client, "Say OK.", max_tokens=60, min_tokens=40)
    assert longer.usage.completion_tokens >= 40
    forced = chat(client, "Say OK.", max_tokens=40, ignore_eos=True)
    assert forced.usage.completion_tokens == 40 and forced.choices[0].finish_reason == "length"
    assert "<|im_end|>" not in forced.choices[0].message.content
    raw = chat(client, "Say OK.", max_tokens=40, ignore_eos=True, skip_special_tokens=False)
    assert "<|im_end|>" in raw.choices[0].message.content


# ----- sampling -------------------------------------------------------------------------------

def test_top_k_1_top_p_tiny_and_min_p_1_are_greedy_even_when_hot(client, tokenizer, greedy_ids):
    text = tokenizer.decode(greedy_ids)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        reply = complete(client, temperature=1.5, seed=3, ignore_eos=True, **kw)
        assert reply.choices[0].text == text, kw


def test_seed_reproduces_while_other_requests_run(client):
    def sample(seed):
        return complete(client, temperature=1.0, max_tokens=24, seed=seed, ignore_eos=True).choices[0].text

    alone = sample(11)
    with ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(complete, client, prompt=f"Story {i}:", temperature=1.0, max_tokens=40) for i in range(4)]
        beside = [pool.submit(sample, 11), pool.submit(sample, 12)]
        [f.result() for f in noise]
        same, other = beside[0].result(), beside[1].result()
    assert same == alone
    assert other != alone


def test_n_choices_greedy_equal_sampled_distinct(client):
    greedy = complete(client, n=3, max_tokens=8)
    assert len(greedy.choices) == 3 and len({c.text for c in greedy.choices}) == 1
    sampled = complete(client, n=3, max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    assert len({c.text for c in sampled.choices}) > 1
    assert sampled.usage.completion_tokens == 48


def test_logit_bias_forces_a_token(client, tokenizer):
    token = tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    reply = complete(client, logit_bias={str(token): 100}, max_tokens=6, ignore_eos=True)
    assert reply.choices[0].text == tokenizer.decode([token] * 6)


@pytest.mark.parametrize("kw", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                {"repetition_penalty": 2.0}])
def test_penalties_break_greedy_repetition(client, tokenizer, kw):
    plain = complete(client, prompt=REPETITIVE, max_tokens=24, ignore_eos=True).choices[0].text
    penalised = complete(client, prompt=REPETITIVE, max_tokens=24, ignore_eos=True, **kw).choices[0].text
    assert most_repeats(tokenizer, penalised) < most_repeats(tokenizer, plain), (plain, penalised)


def test_user_is_accepted(client, greedy_ids, tokenizer):
    reply = complete(client, user="user-1234", max_tokens=4, ignore_eos=True)
    assert reply.choices[0].text == tokenizer.decode(greedy_ids[:4])


# ----- logprobs -------------------------------------------------------------------------------

def hf_logprobs(model_dir, ids: list[int], num_prompt: int) -> torch.Tensor:
    """log_softmax of transformers' logits at each generated position."""
    model = hf_reference.load(str(model_dir))
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[num_prompt - 1:-1]


def test_completion_logprobs_equal_transformers(client, model_dir, prompt_ids, greedy_ids):
    reply = complete(client, logprobs=3, max_tokens=8, ignore_eos=True)
    lp = reply.choices[0].logprobs
    expected = hf_logprobs(model_dir, prompt_ids + greedy_ids[:8], len(prompt_ids))
    assert len(lp.token_logprobs) == 8
    for i, (got, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        assert abs(got - expected[i, greedy_ids[i]].item()) < 1e-3
        assert len(top) >= 3
        best = torch.topk(expected[i], 3)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.values.tolist(), abs=1e-3)


def test_chat_logprobs_equal_transformers(client, model_dir, tokenizer):
    messages = [{"role": "user", "content": "Name a color."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=2)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out_ids = hf_reference.greedy(model_dir, prompt_ids, 6)
    expected = hf_logprobs(model_dir, prompt_ids + out_ids, len(prompt_ids))
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content][:len(out_ids)] == [tokenizer.decode([t]) for t in out_ids]
    for i, entry in enumerate(content):
        assert abs(entry.logprob - expected[i, out_ids[i]].item()) < 1e-3
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(expected[i].max().item(), abs=1e-3)


# ----- chat -----------------------------------------------------------------------------------

def test_chat_roles_content_parts_and_max_completion_tokens(client, smol_stack, tokenizer):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Capital of Italy?"},
                {"role": "assistant", "content": "Rome."},
                {"role": "user", "content": "And of France?"}]
    # Text parts are joined with newlines, as vLLM does.
    as_parts = [{**m, "content": [{"type": "text", "text": line} for line in m["content"].split("\n")]}
                for m in messages]
    messages[0]["content"] = "You answer in one word.\nNo sentences."
    as_parts[0]["content"] = [{"type": "text", "text": "You answer in one word."},
                              {"type": "text", "text": "No sentences."}]
    text = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    parts = client.chat.completions.create(model=MODEL, messages=as_parts, temperature=0,
                                           max_completion_tokens=8)
    assert parts.choices[0].message.content == text.choices[0].message.content
    assert token_counts(parts.usage) == token_counts(text.usage)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert text.usage.prompt_tokens == len(prompt_ids)
    expected = smol_stack.generate(prompt_ids, 8)
    assert text.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    capped = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_completion_tokens=2, extra_body={"ignore_eos": True})
    assert capped.usage.completion_tokens == 2 and capped.choices[0].finish_reason == "length"


@pytest.mark.parametrize("content", ["用三个词描述巴黎的天气。", "Reply with emojis only: 🎉🐍🚀🌍 and 👩‍👩‍👧‍👦!"])
def test_stream_equals_non_stream_text_and_usage(client, content):
    whole = chat(client, content, max_tokens=40, seed=1)
    stream = chat(client, content, max_tokens=40, seed=1, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    text = "".join(pieces)
    assert text == whole.choices[0].message.content
    assert "\ufffd" not in text
    assert token_counts(usage) == token_counts(whole.usage)


def test_completion_stream_equals_non_stream(client):
    whole = complete(client, prompt="Ce matin à Paris, 我们", max_tokens=24)
    chunks = list(complete(client, prompt="Ce matin à Paris, 我们", max_tokens=24, stream=True,
                           stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert token_counts(chunks[-1].usage) == token_counts(whole.usage)


# ----- the other endpoints and errors ---------------------------------------------------------

def test_models_version_tokenize_detokenize(client, smol_stack, tokenizer):
    assert [m.id for m in client.models.list()] == [MODEL]
    root = smol_stack.root_url
    assert httpx.get(root + "/version").json()["version"]
    ids = httpx.post(root + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    assert ids == tokenizer(PROMPT)["input_ids"]
    text = httpx.post(root + "/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert text == PROMPT


def test_errors_in_openai_shape(client, smol_stack):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert err.value.body["code"] == 404 or err.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, top_p=1.5)
    assert err.value.body["param"] == "top_p" and "top_p" in err.value.body["message"]
    reply = httpx.post(smol_stack.base_url + "/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and set(json.loads(reply.text)["error"]) >= {"message", "type", "param", "code"}


# ----- vLLM's extras: continue_final_message, include_stop_str_in_output, token bans, truncation,
# text cut inside a character ------------------------------------------------------------------

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
    cut = complete(client, prompt, max_tokens=8, truncate_prompt_tokens=6, ignore_eos=True)
    assert cut.usage.prompt_tokens == 6
    same = complete(client, ids[-6:], max_tokens=8, ignore_eos=True)
    assert cut.choices[0].text == same.choices[0].text


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
