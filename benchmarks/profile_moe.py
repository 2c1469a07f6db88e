"""Where a mixture-of-experts decode step's time goes on the CPU, and what its experts cost:

    python benchmarks/profile_moe.py --output moe.json   # Qwen3-MoE's shape, scaled to a laptop

1. One MoE layer (worker/models/moe.py) at each --batches size, three ways over the same random
   routing: `grouped` (the worker's path: the token-expert pairs sorted by expert, one matmul
   pair per expert that received tokens), `transformers` (its Qwen3MoeExperts loop, which also
   groups by expert but finds each expert's tokens with a one-hot mask) and `per_pair` (each
   pair's expert weights gathered: the cost of not grouping). Each keeps its fastest of
   --rounds; the router (softmax, top-k) is timed apart.
2. A whole decode step of a Qwen3MoeForCausalLM of --layers layers with dummy weights, through
   the ModelRunner (plans built here, no gRPC): ms per step and the share in the MoE layers.

Weight bytes read per layer: at batch 64 with top-8 of 64 experts, nearly every expert is
chosen by some token, and the grouped path reads each active expert's weights once per step
(`grouped_weight_mib`), where the per-pair path reads them once per pair, 512 times an expert's
weights (`per_pair_weight_mib`): the reason the grouped path keeps up as the batch grows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pagedserve.v1 import scheduler_pb2, worker_pb2  # noqa: E402
from pagedserve.scheduler.validation import with_defaults  # noqa: E402
from pagedserve.worker.config import WorkerConfig  # noqa: E402
from pagedserve.worker.model_runner import ModelRunner  # noqa: E402
from pagedserve.worker.models.layers import ActAndMul  # noqa: E402
from pagedserve.worker.models.moe import SparseMoeBlock, grouped_experts, route  # noqa: E402


def fastest(fn, rounds: int) -> float:
    """Seconds of fn's fastest call of `rounds` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def per_pair(x, gate_up, down, weights, ids):
    """Each (token, expert) pair with its expert's weights gathered: no grouping."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    rows = x.repeat_interleave(k, 0)
    h = torch.bmm(gate_up[flat], rows.unsqueeze(-1)).squeeze(-1)
    gate, up = h.chunk(2, -1)
    out = torch.bmm(down[flat], (torch.nn.functional.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
    return (out * weights.reshape(-1, 1)).view(T, k, -1).sum(1)


def layer_profile(args) -> list[dict]:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.inter, num_experts=args.experts,
                            num_experts_per_tok=args.top_k)
    hf = Qwen3MoeExperts(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.gate_up_proj.copy_(torch.randn(hf.gate_up_proj.shape, generator=gen) * 0.02)
        hf.down_proj.copy_(torch.randn(hf.down_proj.shape, generator=gen) * 0.02)
    gate_up, down = hf.gate_up_proj.data, hf.down_proj.data
    router = torch.randn(args.experts, args.hidden, generator=gen) * 0.05
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    act = ActAndMul("silu")
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, args.hidden, generator=gen)
        with torch.inference_mode():
            weights, ids = route(x @ router.T, args.top_k, renormalize=True)
            active = int(torch.unique(ids).numel())
            times = {
                "router_ms": fastest(lambda: route(x @ router.T, args.top_k, True), args.rounds),
                "grouped_ms": fastest(lambda: grouped_experts(x, gate_up, down, weights, ids, act), args.rounds),
                "transformers_ms": fastest(lambda: hf(x, ids, weights), args.rounds),
            }
            if batch * args.top_k * expert_bytes <= args.per_pair_limit_mib << 20:
                times["per_pair_ms"] = fastest(lambda: per_pair(x, gate_up, down, weights, ids), args.rounds)
        row = {"batch": batch, "active_experts": active, **{k: round(v * 1e3, 3) for k, v in times.items()},
               "grouped_weight_mib": round(active * expert_bytes / 2**20, 2),
               "per_pair_weight_mib": round(batch * args.top_k * expert_bytes / 2**20, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def model_dir(args, path: Path) -> Path:
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(hidden_size=args.hidden, intermediate_size=args.inter * 4, moe_intermediate_size=args.inter,
                   num_experts=args.experts, num_experts_per_tok=args.top_k, num_hidden_layers=args.layers,
                   num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                   head_dim=64, vocab_size=args.vocab, max_position_embeddings=4096, norm_topk_prob=True,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0,
                   architectures=["Qwen3MoeForCausalLM"]).save_pretrained(path)
    return path


def step_profile(args, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        block_size, prompt_len, steps = 16, 32, args.steps
        blocks_per_seq = -(-(prompt_len + steps + 2) // block_size)
        runner = ModelRunner(WorkerConfig(model=str(model_dir(args, Path(tmp))), load_format="dummy",
                                          block_size=block_size, num_gpu_blocks_override=batch * blocks_per_seq,
                                          num_threads=args.threads))
    moe_seconds = [0.0]
    for block in (m for m in runner.model.modules() if isinstance(m, SparseMoeBlock)):
        inner = block.forward

        def timed(x, inner=inner):
            start = time.perf_counter()
            try:
                return inner(x)
            finally:
                moe_seconds[0] += time.perf_counter() - start
        block.forward = timed
    params = with_defaults(scheduler_pb2.SamplingParams(temperature=0))
    gen = torch.Generator().manual_seed(1)
    new = [worker_pb2.NewSequence(seq_id=i, params=params,
                                  token_ids=torch.randint(1, args.vocab, (prompt_len,), generator=gen).tolist())
           for i in range(batch)]
    sched = [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=prompt_len, new_block_ids=list(
        range(i * blocks_per_seq, (i + 1) * blocks_per_seq))) for i in range(batch)]
    runner.execute(worker_pb2.StepPlan(step_id=1, new_sequences=new, scheduled=sched))
    decode = [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=1) for i in range(batch)]
    runner.execute(worker_pb2.StepPlan(step_id=2, scheduled=decode))  # warm-up
    moe_seconds[0] = 0.0
    start = time.perf_counter()
    for step in range(steps):
        result = runner.execute(worker_pb2.StepPlan(step_id=3 + step, scheduled=decode))
        assert not result.error, result.error
    total = time.perf_counter() - start
    row = {"batch": batch, "layers": args.layers, "step_ms": round(total / steps * 1e3, 2),
           "moe_ms": round(moe_seconds[0] / steps * 1e3, 2), "moe_share": round(moe_seconds[0] / total, 3)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--per-pair-limit-mib", type=int, default=2048,
                        help="skip the per-pair way where its gathered weights would exceed this")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"config": {k: v for k, v in vars(args).items() if k != "output"}, "threads": torch.get_num_threads(),
              "layer": layer_profile(args), "step": [step_profile(args, b) for b in args.batches]}
    if args.output:
        args.output.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
