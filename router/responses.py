"""OpenAI's response shapes: whole responses and streamed chunks, for completions and for chat.

Both classes offer the same four builders, so the serving loop does not care which API it serves.
Choices are numbered prompt-major: choice `i * n + j` is sequence j of prompt i.
"""
from __future__ import annotations

from router.output import Delta, TokenLogprob
from router.protocol import GenerationRequest
from router.tokenizer import Tokenizer

# JSON has no -inf; a token the model rules out entirely still needs a number (vLLM's choice).
MIN_LOGPROB = -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


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

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def chunk_envelope(self, choices: list[dict]) -> dict:
        out = self.envelope(self.chunk_object_name, choices)
        if self.request.include_usage:
            out["usage"] = None  # OpenAI's convention: only the last chunk carries usage
        return out

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

    def chunk(self, index: int, delta: Delta) -> dict:
        raise NotImplementedError

    def final_choice(self, index: int, result: Delta) -> dict:
        raise NotImplementedError


class CompletionResponses(Responses):
    object_name = chunk_object_name = "text_completion"

    def echo(self, index: int) -> str:
        """The prompt text a choice starts with when `echo` is set."""
        if not self.request.echo:
            return ""
        prompt = self.request.prompts[index // self.request.n]
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        return prompt.text

    def opening(self) -> list[dict]:
        count = len(self.request.prompts) * self.request.n
        return [self.chunk_envelope([self.choice(i, self.echo(i), None, None)])
                for i in range(count) if self.request.echo]

    def chunk(self, index: int, delta: Delta) -> dict:
        return self.chunk_envelope([self.choice(index, delta.text, self.logprobs(index, delta),
                                                delta.finish_reason)])

    def final_choice(self, index: int, result: Delta) -> dict:
        return self.choice(index, self.echo(index) + result.text, self.logprobs(index, result),
                           result.finish_reason)

    @staticmethod
    def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def logprobs(self, index: int, delta: Delta) -> dict | None:
        if self.request.logprobs is None:
            return None
        shift = len(self.echo(index))
        return {"tokens": [self.tokenizer.token_str(lp.token_id) for lp in delta.logprobs],
                "token_logprobs": [clamp(lp.logprob) for lp in delta.logprobs],
                "top_logprobs": [self.top(lp) for lp in delta.logprobs],
                "text_offset": [shift + lp.text_offset for lp in delta.logprobs]}

    def top(self, lp: TokenLogprob) -> dict[str, float]:
        # As vLLM does: the sampled token is listed even when it is not among the top k.
        alternatives = {lp.token_id: lp.logprob, **dict(lp.top)}
        ranked = sorted(alternatives.items(), key=lambda tv: -tv[1])
        return {self.tokenizer.token_str(t): clamp(v) for t, v in ranked}


class ChatResponses(Responses):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def opening(self) -> list[dict]:
        """OpenAI streams the assistant's role first, in a chunk of its own for each choice."""
        count = len(self.request.prompts) * self.request.n
        return [self.chunk_envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                for i in range(count)]

    def chunk(self, index: int, delta: Delta) -> dict:
        message = {"content": delta.text} if delta.text else {}
        if delta.tool_calls:  # OpenAI numbers a choice's calls in the chunks that carry them
            message["tool_calls"] = [{"index": k, **call} for k, call in enumerate(delta.tool_calls)]
        return self.chunk_envelope([{"index": index, "delta": message,
                                     "logprobs": self.logprobs(delta),
                                     "finish_reason": delta.finish_reason}])

    def final_choice(self, index: int, result: Delta) -> dict:
        message = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message.update(content=result.text or None, tool_calls=result.tool_calls)
        return {"index": index, "message": message,
                "logprobs": self.logprobs(result), "finish_reason": result.finish_reason}

    def logprobs(self, delta: Delta) -> dict | None:
        if self.request.logprobs is None:
            return None
        return {"content": [self.entry(lp.token_id, lp.logprob, lp.top) for lp in delta.logprobs]}

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> dict:
        out = {"token": self.tokenizer.token_str(token_id), "logprob": clamp(logprob),
               "bytes": list(self.tokenizer.token_bytes(token_id))}
        if top is not None:
            out["top_logprobs"] = [self.entry(t, v, None) for t, v in top]
        return out
