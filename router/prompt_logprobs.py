"""The prompt's logprobs in the two shapes clients know: vLLM's `prompt_logprobs` list, and the
prompt's part of a completion's `logprobs` when `echo` is set (what lm-evaluation-harness reads).

Both start with null: the first prompt token has nothing before it to be predicted from.
"""
from __future__ import annotations

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.router.detokenizer import IncrementalDetokenizer
from pagedserve.router.output import TextLogprob, clamp
from pagedserve.router.tokenizer import Tokenizer


def vllm_prompt_logprobs(entries: list[pb.PromptLogprob], k: int, tokenizer: Tokenizer) -> list[dict | None]:
    """[None, {token id (str): {"logprob", "rank", "decoded_token"}}, ...], one per prompt token:
    the prompt's own token first, then the k most likely (ranks 1..k), as vLLM's server answers."""
    def logprob(value: float, rank: int, token: int) -> dict:
        return {"logprob": clamp(value), "rank": rank,
                "decoded_token": tokenizer.decode([token], skip_special_tokens=False)}

    out: list[dict | None] = [None]
    for entry in entries:
        position = {str(entry.token_id): logprob(entry.logprob, entry.rank, entry.token_id)}
        for rank, top in enumerate(entry.top[:k], start=1):
            position.setdefault(str(top.token_id), logprob(top.logprob, rank, top.token_id))
        out.append(position)
    return out


def echoed(prompt_ids: list[int], entries: list[pb.PromptLogprob], k: int,
           tokenizer: Tokenizer) -> tuple[list[int], list[TextLogprob]]:
    """The prompt as a completion's echoed logprobs see it: each token's offset in the decoded
    prompt text, and for tokens 1.. their logprob and k alternatives."""
    offsets, chars = [], 0
    detokenizer = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    for token_id in prompt_ids:
        offsets.append(chars)
        chars += len(detokenizer.add(token_id))
    logprobs = [TextLogprob(entry.token_id, entry.logprob, [(t.token_id, t.logprob) for t in entry.top[:k]], offset)
                for entry, offset in zip(entries, offsets[1:])]
    return offsets, logprobs
