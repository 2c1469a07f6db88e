"""The router's text logic on its own: incremental detokenization, stop strings, and one choice's
output (hidden stop tokens, usage counts, logprob offsets). No server, no scheduler."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.detokenizer import IncrementalDetokenizer
from pagedserve.router.output import ChoiceOutput, Delta
from pagedserve.router.prompts import Prompt
from pagedserve.router.protocol import GenerationRequest
from pagedserve.router.responses import ChatResponses, CompletionResponses
from pagedserve.router.sse import event
from pagedserve.router.stop import StopStrings

TEXTS = ["Hello, world! How are you?", "你好，世界！今天天气很好。", "emoji 🎉🤖👍🏽 and flags 🇫🇷",
         "mixed 中文 and English, ça va? 😀", "  leading spaces\n\ttabs and newlines\n"]


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(t) for t in ids] + [detokenizer.flush()]


# ----- detokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_rebuilds_text_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    deltas = stream(IncrementalDetokenizer(tokenizer.decode), ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_waits_for_the_last_byte_of_a_character(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False).ids
    assert len(ids) > 1, "the test needs an emoji split across tokens"
    deltas = stream(IncrementalDetokenizer(tokenizer.decode), ids)
    assert deltas[:len(ids) - 1] == [""] * (len(ids) - 1)
    assert deltas[len(ids) - 1] == "🎉"


def test_detokenizer_after_a_prompt_continues_its_text(tokenizer):
    prompt = tokenizer.encode("Once upon a time 你", add_special_tokens=False).ids
    output = tokenizer.encode(" there was 好 a 🐉", add_special_tokens=False).ids
    deltas = stream(IncrementalDetokenizer(tokenizer.decode, prompt), output)
    assert "".join(deltas) == tokenizer.decode(output)


def byte_decoder(pieces: dict[int, bytes], strip_leading_space: bool = False):
    """A toy tokenizer: each id is a byte string; optionally SentencePiece's leading-space rule."""
    def decode(ids):
        text = b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
        return text[1:] if strip_leading_space and text.startswith(" ") else text
    return decode


def test_detokenizer_holds_partial_utf8_and_withholds_it_at_the_end():
    euro = "€".encode()  # three bytes
    pieces = {1: b"a", 2: euro[:1], 3: euro[1:2], 4: euro[2:], 5: b"b" + euro[:1]}
    assert stream(IncrementalDetokenizer(byte_decoder(pieces)), [1, 2, 3, 4]) == \
        ["a", "", "", "€", ""]
    # A sequence that ends inside a character never shows its bytes (no U+FFFD), as vLLM's; a
    # whole character in the same token as the broken one's first byte still shows.
    assert stream(IncrementalDetokenizer(byte_decoder(pieces)), [1, 2, 3]) == ["a", "", "", ""]
    assert "".join(stream(IncrementalDetokenizer(byte_decoder(pieces)), [1, 5])) == "ab"


def test_detokenizer_ends_an_emoji_cut_by_max_tokens_on_the_last_whole_character(tokenizer):
    text = "月🌙月🌙"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    for cut in range(1, len(ids) + 1):
        whole = tokenizer.decode(ids[:cut])
        expected = whole.rstrip("\ufffd")
        assert "".join(stream(IncrementalDetokenizer(tokenizer.decode), ids[:cut])) == expected
        assert text.startswith(expected)
    assert any(tokenizer.decode(ids[:cut]).endswith("\ufffd") for cut in range(len(ids))), \
        "the test needs a cut inside a character"


def test_detokenizer_uses_prompt_context_for_leading_spaces():
    pieces = {1: b" Hello", 2: b" world"}
    decode = byte_decoder(pieces, strip_leading_space=True)
    assert stream(IncrementalDetokenizer(decode), [2]) == ["world", ""]
    assert stream(IncrementalDetokenizer(decode, [1]), [2]) == [" world", ""]


def test_detokenizer_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False).ids
    im_end = tokenizer.token_to_id("<|im_end|>")
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    assert "".join(stream(IncrementalDetokenizer(decode), [*ids, im_end, *ids])) == "hihi"


# ----- stop strings ------------------------------------------------------------------------------

def run_stop(stops, deltas, include=False):
    checker, out = StopStrings(stops, include), []
    for delta in deltas:
        released, matched = checker.push(delta)
        out.append(released)
        if matched:
            return out, True
    out.append(checker.flush())
    return out, False


def test_stop_string_truncates_output():
    assert run_stop(["END"], ["The answer", " is 42. END of", " story"]) == \
        (["The answer", " is 42. "], True)


def test_stop_string_split_across_deltas_is_held_back():
    out, matched = run_stop(["<|end|>"], ["abc<", "|e", "nd", "|>tail"])
    assert matched and out == ["abc", "", "", ""]


def test_included_stop_string_ends_the_text_after_it_and_is_still_held_back():
    assert run_stop(["G"], ["ABC", "DEF", "GHI"], include=True) == (["ABC", "DEF", "G"], True)
    out, matched = run_stop(["<|end|>"], ["abc<", "|e", "nd", "|>tail"], include=True)
    assert matched and out == ["abc", "", "", "<|end|>"]
    assert run_stop(["world", "lo w"], ["hello world"], include=True) == (["hello w"], True)


def test_partial_match_that_fails_is_released():
    out, matched = run_stop(["<|end|>"], ["abc<|e", "x and more"])
    assert not matched and "".join(out) == "abc<|ex and more"
    assert out[0] == "abc"


def test_earliest_stop_string_wins():
    assert run_stop(["world", "lo w"], ["hello world"]) == (["hel"], True)


def test_a_shorter_stop_completing_first_ends_the_text():
    # "bc" completes while "abcd" is still only a prefix: the output ends right there.
    assert run_stop(["abcd", "bc"], ["xa", "b", "c", "d"]) == (["x", "", "a"], True)


def test_stop_strings_do_not_count_before_min_tokens():
    checker = StopStrings(["stop"])
    assert checker.push("stop here", can_stop=False) == ("stop here", False)
    assert checker.push(" now stop", can_stop=True) == (" now ", True)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc<|>d", max_size=40),
       stops=st.lists(st.text(alphabet="abc<|>", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_strings_never_leak(text, stops, cuts):
    """Whatever the deltas, the released text at every moment is a prefix of the final output,
    and the final output ends at the earliest stop string of the text seen when a delta first
    completes one (as vLLM, which checks after each token: a short stop completing inside a
    longer one's prefix ends the text there)."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, matched = run_stop(stops, deltas)
    expected, found = text, False
    for end in bounds[1:]:
        starts = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if starts:
            expected, found = text[:min(starts)], True
            break
    assert "".join(out) == expected and matched == found


# ----- one choice's output -------------------------------------------------------------------------

def message(ids, finish=pb.FINISH_REASON_UNSPECIFIED, logprobs=False):
    lps = [pb.TokenLogprob(token_id=t, logprob=-1.0) for t in ids] if logprobs else []
    return pb.GenerateResponse(token_ids=ids, finish_reason=finish, logprobs=lps)


def choice(tokenizer, stops=(), hidden=frozenset(), min_tokens=0) -> ChoiceOutput:
    return ChoiceOutput(IncrementalDetokenizer(tokenizer.decode), StopStrings(stops), hidden,
                        min_tokens)


def test_choice_hides_its_stop_token_but_counts_it(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False).ids
    stop_id = tokenizer.token_to_id("!")
    out = choice(tokenizer, hidden=frozenset({stop_id}))
    delta = out.add(message([*ids, stop_id], pb.FINISH_REASON_STOP))
    assert (delta.text, delta.finish_reason, out.num_tokens) == ("Hi there", "stop", len(ids) + 1)


def test_choice_with_included_stop_strings_shows_its_stop_token(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False).ids
    stop_id = tokenizer.token_to_id("!")
    out = ChoiceOutput(IncrementalDetokenizer(tokenizer.decode), StopStrings([], True), frozenset())
    delta = out.add(message([*ids, stop_id], pb.FINISH_REASON_STOP))
    assert (delta.text, delta.finish_reason) == ("Hi there!", "stop")


def test_choice_stops_counting_at_the_stop_string(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False).ids
    out = choice(tokenizer, stops=["three"])
    text = "".join(out.add(message([t])).text for t in ids)
    assert text == "one two " and out.finish_reason == "stop" and out.stopped_here
    assert out.num_tokens == 3  # "one", " two", " three"
    assert not out.add(message(ids[:1]))  # tokens after the stop are ignored


def test_choice_logprob_offsets_point_into_its_text(tokenizer):
    ids = tokenizer.encode("alpha beta gamma", add_special_tokens=False).ids
    delta = choice(tokenizer).add(message(ids, pb.FINISH_REASON_LENGTH, logprobs=True))
    offsets = [lp.text_offset for lp in delta.logprobs]
    pieces = [delta.text[a:b] for a, b in zip(offsets, [*offsets[1:], len(delta.text)])]
    assert pieces == [tokenizer.decode([t]) for t in ids]


def test_choice_output_gathers_what_its_deltas_carried(tokenizer):
    """The whole output (what the offline API returns) is its deltas put together: every kept
    token id, the text, one logprob per token and their sum, and which stop string ended it."""
    ids = tokenizer.encode("one two three four", add_special_tokens=False).ids
    out = choice(tokenizer, stops=["three"])
    deltas = [out.add(message([t], logprobs=True)) for t in ids]
    assert out.token_ids == ids[:3] and out.text == "".join(d.text for d in deltas) == "one two "
    assert [lp.token_id for lp in out.logprobs] == ids[:3] and out.cumulative_logprob == -3.0
    assert (out.finish_reason, out.stop_reason) == ("stop", "three")


def test_choice_output_names_its_stop_token_id_but_not_eos(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False).ids
    stop_id, eos = tokenizer.token_to_id("!"), tokenizer.token_to_id("<|endoftext|>")
    for last, reason in [(stop_id, stop_id), (eos, None)]:
        out = ChoiceOutput(IncrementalDetokenizer(tokenizer.decode), StopStrings([]),
                           frozenset({stop_id, eos}), stop_token_ids=frozenset({stop_id}))
        out.add(message([*ids, last], pb.FINISH_REASON_STOP))
        assert (out.text, out.token_ids, out.stop_reason) == ("Hi there", [*ids, last], reason)


# ----- streamed chunks -----------------------------------------------------------------------------

def request(kind, include_usage, echo=False):
    return GenerationRequest(kind=kind, prompts=[Prompt([1, 2], "a prompt")], params=pb.SamplingParams(),
                             n=2, stream=True, include_usage=include_usage, stop=[], logprobs=None,
                             echo=echo, prompt_logprobs=None, generate=True,
                             skip_special_tokens=True, hidden_stop_ids=frozenset())


@pytest.mark.parametrize("responses_class,kind", [(CompletionResponses, "completion"),
                                                  (ChatResponses, "chat")])
@pytest.mark.parametrize("include_usage,echo", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("text", ["", 'quote " back\\slash\nnewline\ttab \x01', *TEXTS])
@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
def test_plain_chunk_events_are_the_chunks_serialized(responses_class, kind, include_usage, echo,
                                                      text, finish_reason):
    """The per-token fast path (the serialized envelope around the choice) gives the very bytes
    of serializing the chunk's dict, whatever the text and wherever the choice is."""
    def responses():
        return responses_class('cmpl-\u00e9"x', "m\u00f6del", 1700000000, None,
                               request(kind, include_usage, echo and kind == "completion"))

    fast, slow = responses(), responses()
    for index in (0, 1, 0):  # completions with echo: a choice's first chunk carries the echo
        delta = Delta(text, finish_reason=finish_reason)
        assert fast.chunk_event(index, delta) == event(slow.chunk(index, delta))
