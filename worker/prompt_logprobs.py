"""Prompt logprobs: for the prompt positions a step computes, the logprob of the prompt's next token
under the model's raw logits, its rank and the k most likely tokens there (vLLM's prompt_logprobs).

Only the sampling rows go through the LM head in a normal step; a sequence that asks for prompt
logprobs sends its prefill rows through it too. Row r (the hidden state at position r) predicts the
token at position r + 1, so a chunk computing positions [start, end) gives entries for positions
start + 1 .. min(end, num_prompt - 1): the prompt's last row predicts the first generated token,
which the sampler already covers. Every tensor parallel rank runs this (the logits' all-gather is a
collective); the scheduler reads rank 0's result.
"""
from __future__ import annotations

import torch

from pagedserve.v1 import scheduler_pb2, worker_pb2

# Rows per LM head call: bounds the [rows, vocab] float32 logits held at once (256 x 49152 x 4
# bytes = 48 MiB for SmolLM2) whatever the chunk size.
ROWS_PER_PASS = 256


def prompt_rows(seqs, query_lens: list[int]) -> list[tuple[object, int, int, int]]:
    """(sequence, first position, first row in the step's flat batch, count) for each sequence
    that wants prompt logprobs and computes prompt positions with a next prompt token. `seqs` and
    `query_lens` are in batch order; call before the sequences' num_computed moves on."""
    found, row = [], 0
    for seq, n in zip(seqs, query_lens.tolist() if hasattr(query_lens, "tolist") else query_lens):
        if seq.num_prompt_logprobs is not None:  # checked first: most sequences want none
            start = seq.num_computed
            end = min(start + n, seq.num_prompt - 1)
            if end > start:
                found.append((seq, start + 1, row, end - start))
        row += n
    return found


@torch.inference_mode()
def compute(model, hidden: torch.Tensor, seqs, query_lens: list[int]) -> list[worker_pb2.PromptLogprobsChunk]:
    """hidden: [T, hidden_size], the step's rows before the final norm, in batch order. Returns one
    chunk per sequence that has prompt entries this step, in batch order (the caller reorders)."""
    wanted = prompt_rows(seqs, query_lens)
    if not wanted:
        return []
    device = hidden.device
    rows = torch.cat([torch.arange(row, row + count) for _, _, row, count in wanted]).to(device)
    targets = torch.tensor([t for seq, first, _, count in wanted for t in seq.token_ids[first:first + count]],
                           dtype=torch.int64, device=device)
    k = max(seq.num_prompt_logprobs for seq, *_ in wanted)
    chosen, ranks, top_values, top_ids = [], [], [], []
    for begin in range(0, len(rows), ROWS_PER_PASS):
        logprobs = torch.log_softmax(model.compute_logits(hidden[rows[begin:begin + ROWS_PER_PASS]]), dim=-1)
        target = targets[begin:begin + ROWS_PER_PASS, None]
        value = logprobs.gather(1, target)
        chosen.append(value[:, 0])
        ranks.append((logprobs >= value).sum(dim=-1))  # vLLM's rank: ties count against the token
        if k:
            values, ids = logprobs.topk(k, dim=-1)
            top_values.append(values)
            top_ids.append(ids)
    chosen, ranks = torch.cat(chosen).tolist(), torch.cat(ranks).tolist()
    top_values = torch.cat(top_values).tolist() if k else None
    top_ids = torch.cat(top_ids).tolist() if k else None
    targets = targets.tolist()

    chunks, i = [], 0
    for seq, first, _, count in wanted:
        n = seq.num_prompt_logprobs
        entries = [scheduler_pb2.PromptLogprob(
            token_id=targets[j], logprob=chosen[j], rank=ranks[j],
            top=[scheduler_pb2.TopLogprob(token_id=t, logprob=v) for t, v in zip(top_ids[j][:n], top_values[j][:n])]
            if n else [])
            for j in range(i, i + count)]
        chunks.append(worker_pb2.PromptLogprobsChunk(seq_id=seq.seq_id, first_position=first, logprobs=entries))
        i += count
    return chunks
