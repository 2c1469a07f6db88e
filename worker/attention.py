"""Attention backends: write the step's new K/V into their cache slots, then attend over each
sequence's whole context (cached prefix + new tokens, causally).

Both backends take the same inputs and must give the same results:
- `torch`: the CPU serving path. Decodes and prefill chunks read the paged cache (float32 or
  bfloat16) in place with the C kernels of cpu/attention.py; where they cannot be built (or the
  cache is float16), decodes take one SDPA call over a padded gather of their blocks and prefill
  chunks one SDPA call per sequence. Fresh prompts longer than KERNEL_MAX_FRESH_CONTEXT keep SDPA,
  which is faster there.
- `triton`: the varlen paged attention kernel from kernels/ (CUDA, or TRITON_INTERPRET=1 in tests),
  for any power-of-two block size (the kernel tiles the context in >= 16 positions).

Cache layout (the kernels' contract): per layer, K and V of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in slot
table[t // block_size] * block_size + t % block_size.

Per layer, `window` (sliding-window attention: a query at position p sees keys p - window + 1 ..
p, Hugging Face's `sliding_window_overlay`; None: all of them) and `softcap` (Gemma 2: scores
become softcap * tanh(score / softcap) before the softmax). With a window, the blocks of positions
wholly before the window may have been released by the scheduler (their table entries then name
blocks that are no longer the sequence's): the kernels never read them, and the SDPA fallbacks,
which read them, mask them out.
"""
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve.worker.cpu.attention import AttentionKernel, DecodeStep
from pagedserve.worker.cpu.ops import cpu_ops

# A prompt with nothing cached up to this long goes to the C kernel, longer ones to SDPA: on 2 Zen 3
# cores the kernel is 1.4-2.8x faster up to 512 tokens, level at 768, 5% slower at 1024, 10-20% at
# 2048 (`pagedserve bench kernels`, docs/PERFORMANCE.md).
KERNEL_MAX_FRESH_CONTEXT = 768


@dataclass
class AttentionMetadata:
    """Where a step's tokens come from and go, shared by every layer; what every backend reads.
    A backend's prepare() returns it, or its own subclass with what that backend precomputes.

    Sequences are ordered decodes first: the first `num_decodes` have exactly one query token.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32; past a sequence's own blocks, valid ids it never reads
    seq_lens: torch.Tensor  # [B] int32: context length, new tokens included
    query_start_loc: torch.Tensor  # [B + 1] int32: where each sequence's tokens start in the step
    max_query_len: int
    num_decodes: int
    query_lens_cpu: np.ndarray  # [B]: the same numbers as above, on the host (no device sync)
    seq_lens_cpu: np.ndarray  # [B]
    block_size: int


class SdpaChunk(NamedTuple):
    """A prefill chunk attended with one SDPA call: its rows of the step, and its cached context's
    blocks and causal mask (None, None when its whole context is new: plain causal)."""

    rows: slice
    blocks: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """The torch backend's step: which parts go to the C kernels, and what SDPA needs for the rest."""

    use_kernel: bool  # the C kernels serve decodes and the prefill chunks of kernel_prefills
    decode_step: DecodeStep | None  # with the kernel and decodes: its arguments every layer shares
    kernel_prefills: tuple | None  # (block_tables, seq_lens, query_start, query_lens) per sequence
    decode_blocks: torch.Tensor | None  # without the kernel: the decodes' block ids, flat
    decode_valid: torch.Tensor | None  # [num_decodes, 1, 1, L] bool: their padding mask
    sdpa_chunks: list[SdpaChunk]


class TorchAttention:
    """Attention on the CPU path: the C kernels of cpu/attention.py (`kernel`, an AttentionKernel)
    where one is given and the dtype suits it (float32 or bfloat16 on the CPU), else
    scaled_dot_product_attention over K/V gathered from the paged cache."""

    name = "torch"

    def __init__(self, kernel=None):
        self.kernel = kernel

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype = torch.float32) -> TorchAttentionMetadata:
        """What every layer of the step shares, built once; `dtype` is the KV cache's. Everything
        is derived from host-side lists: no device sync."""
        use_kernel = (self.kernel is not None and meta.seq_lens.device.type == "cpu"
                      and dtype in AttentionKernel.DTYPES)
        nd, num_seqs = meta.num_decodes, len(meta.query_lens_cpu)
        starts = np.concatenate([[0], np.cumsum(meta.query_lens_cpu)]).tolist()
        chunks = [(i, starts[i], int(meta.query_lens_cpu[i]), int(meta.seq_lens_cpu[i])) for i in range(nd, num_seqs)]
        kernel_prefills = decode_blocks = decode_valid = decode_step = None
        if use_kernel and nd:
            decode_step = self.kernel.decode_step(meta.block_tables[:nd], meta.seq_lens[:nd], dtype)
        if use_kernel:
            mine = [c for c in chunks if c[2] < c[3] or c[3] <= KERNEL_MAX_FRESH_CONTEXT]
            chunks = [c for c in chunks if not (c[2] < c[3] or c[3] <= KERNEL_MAX_FRESH_CONTEXT)]
            if mine:
                kernel_prefills = self._kernel_prefills(meta, mine)
        elif nd:
            decode_blocks, decode_valid = self._gathered_decodes(meta)
        return TorchAttentionMetadata(
            **vars(meta), use_kernel=use_kernel, decode_step=decode_step, kernel_prefills=kernel_prefills,
            decode_blocks=decode_blocks, decode_valid=decode_valid,
            sdpa_chunks=[self._sdpa_chunk(meta, *c) for c in chunks])

    @staticmethod
    def _kernel_prefills(meta: AttentionMetadata, chunks: list[tuple[int, int, int, int]]) -> tuple:
        """The C kernel's per-sequence tensors for the prefill chunks it takes."""
        seqs = torch.tensor([c[0] for c in chunks])
        return (meta.block_tables[seqs], meta.seq_lens[seqs],
                torch.tensor([c[1] for c in chunks], dtype=torch.int32),
                torch.tensor([c[2] for c in chunks], dtype=torch.int32))

    @staticmethod
    def _sdpa_chunk(meta: AttentionMetadata, seq: int, q_start: int, q_len: int, ctx: int) -> SdpaChunk:
        rows = slice(q_start, q_start + q_len)
        if q_len == ctx:
            return SdpaChunk(rows, None, None)
        blocks = meta.block_tables[seq, : -(-ctx // meta.block_size)]
        # Query i sits at position ctx - q_len + i and sees keys up to that position.
        q_pos = torch.arange(ctx - q_len, ctx, device=blocks.device)
        mask = torch.arange(ctx, device=blocks.device)[None, :] <= q_pos[:, None]
        return SdpaChunk(rows, blocks, mask)

    @staticmethod
    def _gathered_decodes(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' block ids, flat, and their padding mask. Blocks are gathered with
        index_select over a flat list of block ids: several times faster on CPU than advanced
        indexing with the 2-D table."""
        nd, bs = meta.num_decodes, meta.block_size
        num_blocks = -(-int(max(meta.seq_lens_cpu[:nd])) // bs)
        valid = torch.arange(num_blocks * bs, device=meta.seq_lens.device) < meta.seq_lens[:nd, None]
        blocks = meta.block_tables[:nd, :num_blocks].flatten()
        return blocks, valid[:, None, None, :]

    def forward(self, q, k, v, kv_cache, meta: TorchAttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        """q [T, heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, heads, head_dim]; window
        and softcap as in the module's docstring."""
        k_cache, v_cache = kv_cache
        kv_heads, head_dim = k_cache.shape[2:]
        ops = cpu_ops(k)
        if ops is None or not ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping):
            k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

        # Contiguous, whatever q's strides: the kernels write rows of it.
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        nd, num_heads = meta.num_decodes, q.shape[1]
        if meta.decode_step is not None:
            whole = nd == len(q)  # a decode-only step (slices cost as much as the kernel at batch 1)
            self.kernel.decode_with(meta.decode_step, (q if whole else q[:nd]).contiguous(), k_cache, v_cache,
                                    out, scale, window, softcap)
        elif nd:
            # One call for every decode: the padded context [nd, kv_heads, L, d], and the query
            # heads of a KV group laid out as that group's "query rows", so GQA needs no repeat.
            k_ctx = k_cache.index_select(0, meta.decode_blocks).view(nd, -1, kv_heads, head_dim).transpose(1, 2)
            v_ctx = v_cache.index_select(0, meta.decode_blocks).view(nd, -1, kv_heads, head_dim).transpose(1, 2)
            q_grouped = q[:nd].view(nd, kv_heads, num_heads // kv_heads, head_dim)
            valid = meta.decode_valid
            if window:
                first = (meta.seq_lens[:nd] - window)[:, None, None, None]
                valid = valid & (torch.arange(valid.shape[-1], device=valid.device) >= first)
            o = attend(q_grouped, k_ctx, v_ctx, valid, scale, softcap)
            out[:nd] = o.reshape(nd, num_heads, head_dim)
        if meta.kernel_prefills is not None:
            self.kernel.prefill(q.contiguous(), k_cache, v_cache, *meta.kernel_prefills, out, scale, window, softcap)
        for rows, blocks, mask in meta.sdpa_chunks:
            if blocks is None:
                k_seq, v_seq = k[rows], v[rows]
            else:
                ctx = len(mask[0])
                k_seq = k_cache.index_select(0, blocks).view(-1, kv_heads, head_dim)[:ctx]
                v_seq = v_cache.index_select(0, blocks).view(-1, kv_heads, head_dim)[:ctx]
            q_seq = q[rows].transpose(0, 1)[None]
            k_seq, v_seq = (x.repeat_interleave(num_heads // kv_heads, 1) if softcap else x for x in (k_seq, v_seq))
            if window or softcap:
                mask = visible(len(k_seq), rows.stop - rows.start, window, q.device)
            # 4-D [1, heads, len, d]: with 3-D inputs the CPU dispatcher falls back to the math
            # kernel, which materialises every score (several times slower on long prompts).
            o = attend(q_seq, k_seq.transpose(0, 1)[None], v_seq.transpose(0, 1)[None], mask, scale, softcap)
            out[rows] = o[0].transpose(0, 1)
        return out


def visible(ctx: int, q_len: int, window: int | None, device) -> torch.Tensor:
    """[q_len, ctx] bool: which keys the last q_len of ctx positions see, causally and within the
    window (key > query - window, as transformers' sliding_window_overlay)."""
    q_pos = torch.arange(ctx - q_len, ctx, device=device)[:, None]
    k_pos = torch.arange(ctx, device=device)[None, :]
    mask = k_pos <= q_pos
    return mask & (k_pos > q_pos - window) if window else mask


def attend(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """SDPA over [..., heads, len, d] (GQA: k and v may have fewer heads, SDPA's enable_gqa),
    mask bool (None: causal); with softcap, the same in plain torch (SDPA cannot cap scores), k and v
    then as many heads as q."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    return torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


class TritonAttention:
    """The Triton kernels from kernels/: one varlen launch serves prefill chunks and decodes."""

    name = "triton"

    def __init__(self, num_splits: int | None = None):
        from pagedserve import kernels  # lazily: importing triton is slow and needs a GPU or TRITON_INTERPRET=1

        self.kernels = kernels
        self.num_splits = num_splits  # KV splits of decode batches; None: by the SM count

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype | None = None) -> AttentionMetadata:
        """The kernel reads the common metadata as it is: nothing to precompute."""
        return meta

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        """Split-KV decodes are chosen by the batch's shape alone, so a CUDA graph captured for a
        batch size stays right for every context length."""
        k_cache, v_cache = kv_cache
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.kernels.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
            max_query_len=meta.max_query_len, num_splits=self.num_splits, window=window, softcap=softcap,
        )


def make_attention_backend(name: str, device: torch.device, block_size: int):
    """auto: triton on CUDA, torch on CPU."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        if device.type != "cpu":
            return TorchAttention()
        from pagedserve.worker.cpu.attention import attention_kernel
        return TorchAttention(attention_kernel())
    if name == "triton":
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"the triton attention backend needs a power-of-two --block-size, not {block_size}")
        # Compiled Triton cannot read CPU tensors: it would fail at the first step, not here.
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend runs on CUDA tensors: use --device cuda, or "
                             "--attention-backend torch on the CPU (TRITON_INTERPRET=1 runs it there, "
                             "slowly, for tests)")
        return TritonAttention()
    raise ValueError(f"--attention-backend {name!r} is not one of auto, torch, triton")
