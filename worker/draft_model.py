"""Draft-model proposals (speculative decoding, --speculative-config method "draft_model"): the
scheduler gives a decoding sequence k placeholder drafts (and their KV slots); before the step's
forward pass the worker replaces them with the k tokens a small draft model of the same
vocabulary proposes, greedily. The verification path is the n-gram one (worker/
rejection_sampler.py): a greedy draft is a point-mass proposal, for which drawing from the target
and accepting while the draw equals the draft is exact rejection sampling, so sampled outputs
keep the target's distribution and greedy ones are unchanged.

First version: the draft keeps no KV cache between steps. Each step it runs over the sequence's
whole token list (transformers' forward with its own per-call cache for the k - 1 single-token
steps), so no state can go stale under prefix-cache hits (blocks the target wrote), preemption
or rejected drafts; the price is O(sequence length) draft work per step.
"""
from __future__ import annotations

import json

import torch


def draft_model_dir(config_text: str | None) -> str | None:
    """The draft model's directory when --speculative-config names method draft_model, else None
    (the scheduler validates the JSON; a worker started alone gets a ValueError for bad JSON)."""
    if not config_text:
        return None
    value = json.loads(config_text)
    return value.get("model") if isinstance(value, dict) and value.get("method") == "draft_model" else None


class DraftModel:
    def __init__(self, path: str, vocab_size: int, max_model_len: int, dtype: torch.dtype, device: torch.device):
        """Loads the draft checkpoint at path with transformers. Raises ValueError when its
        vocabulary size is not the target's (vocab_size): its token ids would mean other tokens;
        or when its max_position_embeddings is below max_model_len (tokens): it runs over whole
        sequences, and a model with learned positions fails past its own."""
        from transformers import AutoConfig, AutoModelForCausalLM
        hf_config = AutoConfig.from_pretrained(path)
        draft_vocab = hf_config.vocab_size
        draft_len = getattr(hf_config, "max_position_embeddings", None)
        if draft_len is not None and draft_len < max_model_len:
            raise ValueError(f"--speculative-config: the draft model {path} has max_position_embeddings "
                             f"{draft_len}, below --max-model-len {max_model_len}; lower --max-model-len")
        if draft_vocab != vocab_size:
            raise ValueError(f"--speculative-config: the draft model {path} has a vocabulary of {draft_vocab} "
                             f"tokens, the target {vocab_size}; a draft model must share the target's tokenizer")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """The draft's k greedy next tokens after token_ids (the sequence's prompt and output)."""
        out = self.model(input_ids=torch.tensor([token_ids], device=self.device), use_cache=True, logits_to_keep=1)
        drafts = [int(out.logits[0, -1].argmax())]
        for _ in range(k - 1):
            out = self.model(input_ids=torch.tensor([[drafts[-1]]], device=self.device),
                             cache=out.cache, use_cache=True, logits_to_keep=1)
            drafts.append(int(out.logits[0, -1].argmax()))
        return drafts


def fill_drafts(draft: DraftModel, batch, scheduled) -> None:
    """Overwrites each scheduled sequence's placeholder drafts (ScheduledSequence.draft_token_ids,
    in place) with the draft model's proposals after its tokens. Sequences unknown to the batch
    are left for append_drafts to refuse."""
    for entry in scheduled:
        k = len(entry.draft_token_ids)
        seq = batch.seqs.get(entry.seq_id)
        if k and seq is not None:
            entry.draft_token_ids[:] = draft.propose(seq.token_ids, k)
