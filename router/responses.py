"""OpenAI's response shapes: whole responses and streamed chunks, for completions and for chat.

Both classes offer the same four builders, so the serving loop does not care which API it serves.
Choices are numbered prompt-major: choice `i * n + j` is sequence j of prompt i.
"""
from __future__ import annotations

from pagedserve.router.output import Delta, TextLogprob, clamp
from pagedserve.router.prompt_logprobs import echoed, vllm_prompt_logprobs
from pagedserve.router.protocol import GenerationRequest
from pagedserve.router.sse import compact_json, event, json_string
from pagedserve.router.tokenizer import Tokenizer


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class Responses:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, created: int, tokenizer: Tokenizer,
                 request: GenerationRequest):
        self.id = response_id
        self.model = model
        self.created = created
        self.tokenizer = tokenizer
        self.request = request
        # The streamed chunks' envelope, serialized once: a plain text delta's event is this
        # around its choice (chunk_event), with no dict built and no encoder run per token.
        empty = compact_json(self.chunk_envelope([]))  # {"id":...,"choices":[](,"usage":null)}
        split = empty.index('"choices":[]') + len('"choices":[')
        self._event_head = "data: " + empty[:split] + '{"index":'
        self._event_tail = empty[split:] + "\n\n"

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def chunk_envelope(self, choices: list[dict]) -> dict:
        out = self.envelope(self.chunk_object_name, choices)
        if self.request.include_usage:
            out["usage"] = None  # OpenAI's convention: only the last chunk carries usage
        return out

    def token_name(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or "token_id:N" when the client asked for ids
        (vLLM's return_tokens_as_token_ids, for tokens whose text is not unique or not UTF-8)."""
        if self.request.tokens_as_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.token_str(token_id)

    def usage_chunk(self, totals: dict) -> dict:
        out = self.chunk_envelope([])
        out["usage"] = totals
        return out

    def final(self, results: list[Delta], totals: dict) -> dict:
        out = self.envelope(self.object_name,
                            [self.final_choice(i, r) for i, r in enumerate(results)])
        out["usage"] = totals
        return out

    def opening(self) -> list[dict]:
        return []

    def prompt_logprobs(self, index: int) -> list[dict | None] | None:
        """vLLM's prompt_logprobs of choice `index`'s prompt, when the request asked for them."""
        k = self.request.prompt_logprobs
        prompt = self.request.prompts[index // self.request.n]
        if k is None or prompt.logprobs is None:
            return None
        return vllm_prompt_logprobs(prompt.logprobs, k, self.tokenizer)

    def chunk(self, index: int, delta: Delta) -> dict:
        raise NotImplementedError

    def chunk_event(self, index: int, delta: Delta, totals: dict | None = None) -> bytes:
        """event(self.chunk(index, delta)), the same bytes; built from the serialized envelope
        when the choice is plain text (no logprobs, echo or tool calls): the common case, once
        per token and stream. `totals`: the usage so far, which the chunk then carries (vLLM's
        continuous_usage_stats)."""
        if totals is not None:
            out = self.chunk(index, delta)
            out["usage"] = totals
            return event(out)
        rest = self.plain_choice(index, delta)
        if rest is None:
            return event(self.chunk(index, delta))
        return (self._event_head + str(index) + rest + self._event_tail).encode()

    def plain_choice(self, index: int, delta: Delta) -> str | None:
        """The serialized choice after its index, when chunk_event may skip chunk(); else None."""
        return None

    def final_choice(self, index: int, result: Delta) -> dict:
        raise NotImplementedError


class CompletionResponses(Responses):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.echoed: set[int] = set()  # streamed choices whose first chunk (the echo) went out

    def echo(self, index: int) -> str:
        """The prompt text a choice starts with when `echo` is set."""
        if not self.request.echo:
            return ""
        prompt = self.request.prompts[index // self.request.n]
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        return prompt.text

    def chunk(self, index: int, delta: Delta) -> dict:
        # The echo goes with a choice's first chunk: its prompt logprobs come with the first news.
        first = index not in self.echoed
        self.echoed.add(index)
        text = (self.echo(index) if first else "") + delta.text
        return self.chunk_envelope([self.choice(index, text, self.logprobs(index, delta, first),
                                                delta.finish_reason)])

    def plain_choice(self, index: int, delta: Delta) -> str | None:
        if self.request.logprobs is not None or (self.request.echo and index not in self.echoed):
            return None
        return (f',"text":{json_string(delta.text)},"logprobs":null,'
                f'"finish_reason":{json_string(delta.finish_reason)}}}')

    def final_choice(self, index: int, result: Delta) -> dict:
        out = self.choice(index, self.echo(index) + result.text, self.logprobs(index, result, True),
                          result.finish_reason)
        if self.request.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs(index)
        return out

    @staticmethod
    def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def logprobs(self, index: int, delta: Delta, with_echo: bool) -> dict | None:
        if self.request.logprobs is None:
            return None
        shift = len(self.echo(index))
        out = {"tokens": [self.token_name(lp.token_id) for lp in delta.logprobs],
               "token_logprobs": [clamp(lp.logprob) for lp in delta.logprobs],
               "top_logprobs": [self.top(lp) for lp in delta.logprobs],
               "text_offset": [shift + lp.text_offset for lp in delta.logprobs]}
        return self.with_prompt(index, out) if with_echo and self.request.echo else out

    def with_prompt(self, index: int, out: dict) -> dict:
        """The prompt's tokens before the output's, the first with null logprobs (as vLLM)."""
        prompt = self.request.prompts[index // self.request.n]
        offsets, logprobs = echoed(prompt.token_ids, prompt.logprobs or [], self.request.logprobs,
                                   self.tokenizer)
        return {"tokens": [self.token_name(t) for t in prompt.token_ids] + out["tokens"],
                "token_logprobs": [None] + [clamp(lp.logprob) for lp in logprobs] + out["token_logprobs"],
                "top_logprobs": [None] + [self.top(lp) for lp in logprobs] + out["top_logprobs"],
                "text_offset": offsets + out["text_offset"]}

    def top(self, lp: TextLogprob) -> dict[str, float]:
        # As vLLM does: the sampled token is listed even when it is not among the top k.
        alternatives = {lp.token_id: lp.logprob, **dict(lp.top)}
        ranked = sorted(alternatives.items(), key=lambda tv: -tv[1])
        return {self.token_name(t): clamp(v) for t, v in ranked}


class ChatResponses(Responses):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def opening(self) -> list[dict]:
        """OpenAI streams the assistant's role first, in a chunk of its own for each choice; with
        vLLM's `echo`, the echoed message follows in one chunk per choice."""
        count = len(self.request.prompts) * self.request.n
        roles = [self.chunk_envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}])
                 for i in range(count)]
        echoed = [self.chunk(i, Delta(self.request.chat_echo)) for i in range(count)
                  if self.request.chat_echo]
        return roles + echoed

    def chunk(self, index: int, delta: Delta) -> dict:
        message = {"content": delta.text} if delta.text else {}
        if delta.reasoning:  # vLLM's older name and its newer one
            message.update(reasoning_content=delta.reasoning, reasoning=delta.reasoning)
        if delta.tool_calls:  # OpenAI numbers a choice's calls in the chunks that carry them
            message["tool_calls"] = [{"index": k, **call} for k, call in enumerate(delta.tool_calls)]
        return self.chunk_envelope([{"index": index, "delta": message,
                                     "logprobs": self.logprobs(delta),
                                     "finish_reason": delta.finish_reason}])

    def plain_choice(self, index: int, delta: Delta) -> str | None:
        if self.request.logprobs is not None or delta.tool_calls or delta.reasoning:
            return None
        message = f'{{"content":{json_string(delta.text)}}}' if delta.text else "{}"
        return (f',"delta":{message},"logprobs":null,'
                f'"finish_reason":{json_string(delta.finish_reason)}}}')

    def final_choice(self, index: int, result: Delta) -> dict:
        message = {"role": "assistant", "content": self.request.chat_echo + result.text}
        if result.tool_calls:
            message.update(content=result.text or None, tool_calls=result.tool_calls)
        if self.request.reasoning_parser:
            message.update(reasoning_content=result.reasoning or None,
                           reasoning=result.reasoning or None)
        return {"index": index, "message": message,
                "logprobs": self.logprobs(result), "finish_reason": result.finish_reason}

    def final(self, results: list[Delta], totals: dict) -> dict:
        out = super().final(results, totals)
        if self.request.prompt_logprobs is not None:  # one prompt: vLLM puts them on the response
            out["prompt_logprobs"] = self.prompt_logprobs(0)
        return out

    def logprobs(self, delta: Delta) -> dict | None:
        if self.request.logprobs is None:
            return None
        return {"content": [self.entry(lp.token_id, lp.logprob, lp.top) for lp in delta.logprobs]}

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
        out = {"token": self.token_name(token_id), "logprob": clamp(logprob),
               "bytes": list(self.tokenizer.token_bytes(token_id))}
        if top is not None:
            out["top_logprobs"] = [self.entry(t, v, None) for t, v in top]
        return out
