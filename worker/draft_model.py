"""Draft-model proposals (speculative decoding, --speculative-config method "draft_model"): the
scheduler gives a decoding sequence k placeholder drafts (and the KV slots of their positions);
before the step's forward pass the worker replaces them with the k tokens a small draft model of
the same vocabulary proposes: its argmax for greedy requests (a point mass, verified as n-gram
drafts are), for sampled ones a draw from its own distribution q, kept with probability
min(1, p/q) (worker/rejection_sampler.py).

The draft is loaded by the target's loader (worker/loader.py), so any architecture we serve can
be a draft, runs on our attention backends and is sharded like the target under tensor
parallelism (every rank then computes the same all-gathered logits, hence the same drafts).

Its paged KV cache (vLLM v1's design for its drafters): the draft has its own K/V tensors, with
the target's block size and block count, indexed by the target's block tables and slot mapping.
A token at position t has its draft K/V in the same slot as its target K/V, so the scheduler
keeps no draft state: the slots of the k draft positions are the ones it already allocates. The
draft's cache bytes per block are counted in the worker's KV budget (kv_cache.choose_num_blocks),
so the worker reports fewer blocks.

What the draft's cache holds: per live sequence, `computed[seq_id]`, the leading positions whose
draft K/V is in it (0 when the sequence is added). Each step that has drafts, for every
scheduled sequence the draft runs ONE batched varlen forward over the sequence's real tokens from
`computed` up to the end of what the target computes this step (drafts excluded), then k - 1
batched single-token steps for the sequences with drafts (a step without drafts runs no draft:
a runner serving without speculation pays nothing, and the next drafting step catches up). So:
- prefill chunks: the draft follows the target chunk by chunk, in the steps that draft;
- prefix-cache hits and resumed (preempted, recomputed) sequences: a newly added sequence has no
  draft K/V (the cached blocks were written by the target, perhaps of another sequence), so the
  first step catches up from position 0: O(prefix) once, then O(new tokens) per step;
- rejected drafts: single-token step i writes draft i's K/V at position L - 1 + i (L the length
  before drafts); with a of the k drafts accepted, positions up to L + min(a, k - 1) hold K/V
  of the sequence's real tokens, and the rest is overwritten next step (`commit`).
The catch-up writes the same values the target's tokens give, so a block shared through prefix
caching is only rewritten with equal K/V. A target with sliding windows may have released the
blocks behind its window: the catch-up would write draft K/V there, into blocks another
sequence may own, which changes that sequence's proposals, never its outputs (verification).
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import torch

from pagedserve.worker.attention import AttentionMetadata
from pagedserve.worker.kv_cache import allocate_kv_cache, bytes_per_block
from pagedserve.worker.loader import DTYPES, inspect_model_dir, load_model
from pagedserve.worker.rejection_sampler import DRAFT_SALT, DraftPosition, draw, samples_drafts

log = logging.getLogger(__name__)


def draft_model_dir(config_text: str | None) -> str | None:
    """The draft model's directory when --speculative-config names method draft_model, else None
    (the scheduler validates the JSON; a worker started alone gets a ValueError for bad JSON)."""
    if not config_text:
        return None
    value = json.loads(config_text)
    return value.get("model") if isinstance(value, dict) and value.get("method") == "draft_model" else None


class DraftModel:
    def __init__(self, config, path: str, vocab_size: int, max_model_len: int, dtype: torch.dtype, backend):
        """Loads the draft checkpoint at path with the worker's loader (`config`, the target's
        WorkerConfig, with its device, rank, load format and dtype). Raises ValueError when its
        vocabulary size is not the target's (vocab_size): its token ids would mean other tokens;
        or when its max_position_embeddings is below max_model_len (tokens). The KV cache comes
        later (allocate_cache), once the worker knows its block count."""
        name = next(key for key, value in DTYPES.items() if value == dtype)
        draft_config = dataclasses.replace(config, model=path, tokenizer=None, quantization=None, dtype=name,
                                           max_model_len=max_model_len, enable_lora=False)
        hf_config = inspect_model_dir(draft_config).hf_config
        draft_len = getattr(hf_config, "max_position_embeddings", None)
        if draft_len is not None and draft_len < max_model_len:
            raise ValueError(f"--speculative-config: the draft model {path} has max_position_embeddings "
                             f"{draft_len}, below --max-model-len {max_model_len}; lower --max-model-len")
        if hf_config.vocab_size != vocab_size:
            raise ValueError(f"--speculative-config: the draft model {path} has a vocabulary of "
                             f"{hf_config.vocab_size} tokens, the target {vocab_size}; a draft model must "
                             "share the target's tokenizer")
        self.loaded = load_model(draft_config, backend)
        self.model = self.loaded.model
        self.backend, self.dtype, self.device = backend, dtype, torch.device(config.device)
        self.kv_caches: list | None = None
        self.computed: dict[int, int] = {}  # seq_id -> leading positions with draft K/V in the cache
        self.q: dict[int, list[torch.Tensor]] = {}  # this step's sampled drafts: batch row -> q per draft
        self.num_forward_tokens = 0  # tokens run through the draft (its first forward of each step)

    def bytes_per_block(self, block_size: int) -> int:
        """The draft cache's bytes for one block of block_size tokens (the worker's KV budget)."""
        num_layers, kv_heads, head_dim = self.model.kv_cache_shape()
        return bytes_per_block(num_layers, block_size, kv_heads, head_dim, self.dtype)

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        self.kv_caches = allocate_kv_cache(num_blocks, block_size, self.model.kv_cache_shape(), self.dtype,
                                           self.device)

    def add(self, seq_id: int) -> None:
        self.computed[seq_id] = 0  # a new or resumed sequence: nothing of it in the draft's cache

    def free(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.computed.pop(seq_id, None)

    def forward(self, batch, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> torch.Tensor:
        """Runs positions [starts[i], ends[i]) of the sequence at batch row rows[i] (their token
        ids in batch.token_ids, their slots from batch.block_table) through the draft, writing
        their K/V; returns the logits [len(rows), vocab] float32 of each one's last position."""
        order = np.argsort(ends - starts != 1, kind="stable")  # decodes first: the backends' contract
        rows, starts, ends = rows[order], starts[order], ends[order]
        query_lens = ends - starts
        cu = np.cumsum(query_lens)
        positions = np.arange(int(cu[-1])) + np.repeat(starts - (cu - query_lens), query_lens)
        token_rows = np.repeat(rows, query_lens)
        bs = batch.block_size
        slots = batch.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        width = int(-(-ends.max() // bs))
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(device),
            block_tables=torch.from_numpy(np.ascontiguousarray(batch.block_table[rows, :width])).to(device),
            seq_lens=torch.from_numpy(ends.astype(np.int32)).to(device),
            query_start_loc=torch.from_numpy(np.concatenate([[0], cu]).astype(np.int32)).to(device),
            max_query_len=int(query_lens.max()), num_decodes=int(np.count_nonzero(query_lens == 1)),
            query_lens_cpu=query_lens, seq_lens_cpu=ends, block_size=bs)
        input_ids = torch.from_numpy(batch.token_ids[token_rows, positions].astype(np.int64)).to(device)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(device), self.kv_caches,
                            self.backend.prepare(meta, self.dtype))
        logits = self.model.compute_logits(hidden[torch.from_numpy(cu - 1).to(device)])
        return logits[torch.from_numpy(np.argsort(order)).to(device)]  # back to the callers' order

    def choose(self, batch, sampler, rows: np.ndarray, lengths: np.ndarray, logits: torch.Tensor) -> list[int]:
        """The next draft of the sequence at each of `rows`, from the draft's logits [R, vocab] after
        its first lengths[j] tokens: the argmax, or for rejection_sampler.samples_drafts sequences
        a draw from q, the target sampler's distribution over the draft's logits (the request's
        temperature, top-k, top-p, ... applied as for the target), q recorded for verification."""
        tokens = logits.argmax(-1)
        seqs = batch.seqs_at(rows)
        sampled = [j for j, seq in enumerate(seqs) if samples_drafts(seq)]
        if sampled:
            at = [DraftPosition(seqs[j], seqs[j].token_ids[: int(lengths[j])]) for j in sampled]
            q = sampler.distribution(logits[sampled], at)
            tokens[sampled] = draw(q, sampler.uniforms(at, q.device, DRAFT_SALT)).to(tokens.device)
            for j, row_q in zip(sampled, q):
                self.q.setdefault(int(rows[j]), []).append(row_q)
        return tokens.tolist()

    def proposals(self) -> dict[int, torch.Tensor]:
        """The last propose's q [k, vocab] of each sequence (batch row) whose drafts it sampled."""
        return {row: torch.stack(q) for row, q in self.q.items()}

    @torch.inference_mode()
    def propose(self, batch, step, drafts: dict[int, list[int]], sampler, skip=frozenset()) -> None:
        """Writes the draft's proposals (`choose`) over each sequence's placeholder drafts
        (`drafts`, {batch row: placeholders} from rejection_sampler.append_drafts, overwritten in
        place, and their copies in batch.token_ids), after batch.begin_step appended the step's
        blocks. `step` is that ScheduledStep; sequences whose seq_id is in `skip` (pooling) are
        left out; `sampler` is the target's (its distribution and seeded uniforms)."""
        self.q = {}
        rows, ends = [], []
        for row, n in zip(step.rows.tolist(), step.num_tokens.tolist()):
            if int(batch.seq_id_of_row[row]) in skip:
                continue
            rows.append(row)
            ends.append(int(batch.num_computed[row]) + n - len(drafts.get(row, ())))  # real tokens only
        if not rows:
            return
        rows, ends = np.asarray(rows, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        seq_ids = batch.seq_id_of_row[rows].tolist()
        # At least the last real token: a drafting sequence needs the logits there.
        starts = np.minimum([self.computed.get(s, 0) for s in seq_ids], ends - 1)
        self.num_forward_tokens += int((ends - starts).sum())
        logits = self.forward(batch, rows, starts, ends)
        for seq_id, end in zip(seq_ids, ends.tolist()):
            self.computed[seq_id] = end
        drafting = np.asarray([i for i, row in enumerate(rows.tolist()) if row in drafts], dtype=np.int64)
        if not len(drafting):
            return
        rows, ends = rows[drafting], ends[drafting]
        tokens = self.choose(batch, sampler, rows, ends, logits[torch.from_numpy(drafting).to(logits.device)])
        k = np.asarray([len(drafts[row]) for row in rows.tolist()])
        for i in range(max(k)):
            for j, row in enumerate(rows.tolist()):
                if i < k[j]:
                    drafts[row][i] = tokens[j]
                    batch.token_ids[row, ends[j] + i] = tokens[j]
            live = np.flatnonzero(k > i + 1)  # sequences with a draft after this one
            if not len(live):
                break
            # drafts[row][i] sits at position end + i: run it through the draft for the next one.
            step_logits = self.forward(batch, rows[live], ends[live] + i, ends[live] + i + 1)
            tokens = np.zeros(len(rows), dtype=np.int64)
            tokens[live] = self.choose(batch, sampler, rows[live], ends[live] + i + 1, step_logits)
            tokens = tokens.tolist()

    def accepted(self, batch, drafts: dict[int, list[int]], accepted: dict[int, int]) -> None:
        """After verification: a sequence that accepted a of its k drafts keeps the draft K/V of
        the accepted ones that ran through the draft (the first k - 1)."""
        for row, a in accepted.items():
            seq_id = int(batch.seq_id_of_row[row])
            if seq_id in self.computed:
                self.computed[seq_id] += min(a, len(drafts[row]) - 1)
