"""`pagedserve bench kernels`: decode attention over the paged KV cache, as the worker runs it
(its attention backends, on the metadata its batch builds), against torch's SDPA on K/V laid out
contiguously, for several batch sizes and context lengths. Blocks are scattered at random, as a
long-running server leaves them.

Each row also gives the bytes of K/V the step must read and the rate achieved (at the fastest
call), against the device's copy bandwidth measured here (a large tensor copied; read + write
bytes per second).

Then prefill: a step of fresh prompts of each --prompt-lens (as many as fit in --prefill-tokens),
the worker's backend against one SDPA call per sequence, in causal GFLOP/s."""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from pagedserve.v1 import worker_pb2
from pagedserve.worker.attention import AttentionMetadata, TorchAttention, TritonAttention, make_attention_backend
from pagedserve.worker.batch import PersistentBatch

COPY_BYTES = 256 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """(median, fastest) seconds per call, after one warm-up call. On a shared machine the
    fastest is the better estimate of what the kernel itself costs."""
    fn()
    sync(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2], samples[0]


def copy_bandwidth(device: torch.device, dtype: torch.dtype, iters: int) -> float:
    src = torch.empty(COPY_BYTES // dtype.itemsize, dtype=dtype, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / timed(lambda: dst.copy_(src), device, iters)[1]


class RandomStep:
    """One step on a random paged cache, as the worker's batch builds it: `num_seqs` sequences of
    `context` positions, the last `new` of them this step's, their blocks scattered at random."""

    def __init__(self, num_seqs: int, context: int, new: int, args, device, dtype):
        g = torch.Generator().manual_seed(args.seed)
        kvh, heads, d, bs = args.num_kv_heads, args.num_heads, args.head_dim, args.block_size
        blocks_per_seq = -(-context // bs)
        num_blocks = num_seqs * blocks_per_seq + 1
        self.table = torch.randperm(num_blocks, generator=g)[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)
        self.k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g).to(device, dtype)
        self.v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g).to(device, dtype)
        tokens = num_seqs * new
        self.q = torch.randn(tokens, heads, d, generator=g).to(device, dtype)
        self.k_new = torch.randn(tokens, kvh, d, generator=g).to(device, dtype)
        self.v_new = torch.randn(tokens, kvh, d, generator=g).to(device, dtype)
        self.meta = self.plan_metadata(context, new, bs, num_blocks, device)
        self.scale = d ** -0.5

    def plan_metadata(self, context: int, new: int, block_size: int, num_blocks: int, device) -> AttentionMetadata:
        """The step's metadata as the worker builds it: a persistent batch takes the plan's
        sequences (their first `context - new` positions cached) and their block tables."""
        batch = PersistentBatch(block_size, num_blocks, context, 1, len(self.table), device)
        plan = worker_pb2.StepPlan(
            new_sequences=[worker_pb2.NewSequence(seq_id=i, token_ids=[0] * context, num_computed_tokens=context - new)
                           for i in range(len(self.table))],
            scheduled=[worker_pb2.ScheduledSequence(seq_id=i, num_tokens=new, new_block_ids=blocks.tolist())
                       for i, blocks in enumerate(self.table)])
        for sequence in plan.new_sequences:
            batch.add(sequence)
        return batch.prepare_inputs(batch.begin_step(plan.scheduled)).meta

    def runner(self, backend):
        def run():
            meta = backend.prepare(self.meta, self.q.dtype)  # per step in the worker too: shared by every layer
            return backend.forward(self.q, self.k_new, self.v_new, (self.k_cache, self.v_cache), meta, self.scale)
        return run


def decode_case(batch: int, context: int, args, device, dtype, backends) -> list[dict]:
    step = RandomStep(batch, context, 1, args, device, dtype)

    # The same K/V, contiguous per sequence: [batch, kv_heads, context, head_dim].
    def contiguous(cache):
        return cache[step.table].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    k_ctx, v_ctx = contiguous(step.k_cache), contiguous(step.v_cache)
    kv_bytes = 2 * batch * context * args.num_kv_heads * args.head_dim * dtype.itemsize
    runs = {"sdpa_contiguous": lambda: F.scaled_dot_product_attention(
        step.q[:, :, None], k_ctx, v_ctx, scale=step.scale, enable_gqa=True)}
    runs.update((label, step.runner(backend)) for label, backend in backends)
    rows = []
    for name, fn in runs.items():
        median, fastest = timed(fn, device, args.iters)
        rows.append({"kernel": name, "batch": batch, "context": context, "ms": median * 1e3,
                     "min_ms": fastest * 1e3, "kv_bytes": kv_bytes, "bytes_per_s": kv_bytes / fastest})
    return rows


def backends_for(device: torch.device, block_size: int) -> list[tuple[str, object]]:
    """The worker's backends for this device: on a CPU the C decode kernel (when it builds) and the
    gather + SDPA path it replaces."""
    if device.type == "cuda":  # split-KV as the worker chooses it, and never split (its baseline)
        return [("triton", make_attention_backend("triton", device, block_size)),
                ("triton_no_split", TritonAttention(num_splits=1))]
    backends = [("torch_gather_sdpa", TorchAttention())]
    worker_backend = make_attention_backend("torch", device, block_size)
    if worker_backend.kernel is not None:
        backends.insert(0, ("cpu_decode_kernel", worker_backend))
    return backends


def prefill_case(prompt_len: int, args, device, dtype, backends) -> list[dict]:
    num_seqs = max(1, args.prefill_tokens // prompt_len)
    step = RandomStep(num_seqs, prompt_len, prompt_len, args, device, dtype)
    # Causal: query i scores and sums i + 1 keys, 2 FLOPs per multiply-add, q.k and p.v.
    flops = num_seqs * args.num_heads * 4 * args.head_dim * prompt_len * (prompt_len + 1) / 2
    rows = []
    for label, backend in backends:
        median, fastest = timed(step.runner(backend), device, args.iters)
        rows.append({"kernel": label, "num_seqs": num_seqs, "prompt_len": prompt_len, "ms": median * 1e3,
                     "min_ms": fastest * 1e3, "gflops": flops / fastest / 1e9})
    return rows


def prefill_backends_for(device: torch.device, block_size: int) -> list[tuple[str, object]]:
    """What the worker runs for prefill chunks (on a CPU the C kernel up to
    attention.KERNEL_MAX_FRESH_CONTEXT tokens, SDPA above), and one SDPA call per sequence."""
    worker_backend = make_attention_backend("auto", device, block_size)
    if device.type == "cuda":
        return [("triton", worker_backend)]
    return [("worker", worker_backend), ("sdpa_per_sequence", TorchAttention())]


def main(args) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    backends = backends_for(device, args.block_size)
    bandwidth = copy_bandwidth(device, dtype, args.iters)
    rows = []
    print(f"{device.type} {dtype}: copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); "
          f"{args.num_heads} heads, {args.num_kv_heads} kv heads, head_dim {args.head_dim}")
    print(f"{'kernel':<20}{'batch':>6}{'context':>9}{'median ms':>11}{'min ms':>9}{'GB/s':>8}{'of copy':>9}")
    for batch in map(int, args.batch_sizes.split(",")):
        for context in map(int, args.context_lens.split(",")):
            for row in decode_case(batch, context, args, device, dtype, backends):
                row["fraction_of_copy_bandwidth"] = row["bytes_per_s"] / bandwidth
                rows.append(row)
                print(f"{row['kernel']:<20}{batch:>6}{context:>9}{row['ms']:>11.3f}{row['min_ms']:>9.3f}"
                      f"{row['bytes_per_s'] / 1e9:>8.1f}"
                      f"{row['fraction_of_copy_bandwidth']:>9.0%}")
    prefill_rows = []
    print(f"\n{'prefill':<20}{'seqs':>6}{'prompt':>9}{'median ms':>11}{'min ms':>9}{'GFLOP/s':>9}")
    for prompt_len in map(int, args.prompt_lens.split(",")):
        for row in prefill_case(prompt_len, args, device, dtype, prefill_backends_for(device, args.block_size)):
            prefill_rows.append(row)
            print(f"{row['kernel']:<20}{row['num_seqs']:>6}{prompt_len:>9}{row['ms']:>11.3f}{row['min_ms']:>9.3f}"
                  f"{row['gflops']:>9.1f}")
    report = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "copy_bandwidth_bytes_per_s": bandwidth,
              "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
              "block_size": args.block_size, "rows": rows, "prefill_rows": prefill_rows}
    with open(args.result_filename, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.result_filename}")
    return 0
