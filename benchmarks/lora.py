"""Throughput with LoRA adapters in the batch against the base model alone: one worker's
ModelRunner driven in-process (no scheduler, no HTTP), a random Llama and random rank-16 PEFT
adapters on all seven projections. Four settings on the same batch of sequences: LoRA off, LoRA
on with no adapter in the mix, every sequence on one adapter, the sequences spread over four.

    .venv/bin/python benchmarks/lora.py [--seqs 32] [--prompt 64] [--steps 16] [--repeats 3] [--device cpu]

The settings take turns, `--repeats` rounds, and each keeps its best round (on a shared machine the
best round is the one least disturbed). Prints prefill and decode tokens/s per setting and writes
docs/performance/lora.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedserve.scheduler.validation import with_defaults
from pagedserve.v1 import scheduler_pb2, worker_pb2
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.model_runner import ModelRunner

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 16


def build(path: Path, adapters: int, rank: int) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path / "base")
    paths = []
    for i in range(adapters):
        tensors = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in TARGETS:
                tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, m.in_features) * 0.01
                tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, rank) * 0.01
        out = path / f"adapter{i}"
        out.mkdir()
        save_file(tensors, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank,
                                                             "target_modules": list(TARGETS)}))
        paths.append(out)
    return paths


def run(runner: ModelRunner, seqs: int, prompt: int, steps: int, adapters: list[Path]) -> dict:
    """Prefill every sequence in one step, then `steps` decode steps; sequence i on
    adapters[i % len(adapters)] (none: the base model)."""
    params = with_defaults(scheduler_pb2.SamplingParams(temperature=0, ignore_eos=True))
    blocks = -(-(prompt + steps + 1) // BLOCK)
    new, sched = [], []
    for i in range(seqs):
        seq = worker_pb2.NewSequence(seq_id=i, token_ids=[(7 * i + j) % 4000 + 1 for j in range(prompt)], params=params)
        if adapters:
            path = adapters[i % len(adapters)]
            seq.lora_request.CopyFrom(scheduler_pb2.LoRARequest(lora_name=path.name, lora_path=str(path)))
        new.append(seq)
        sched.append(worker_pb2.ScheduledSequence(seq_id=i, num_tokens=prompt,
                                                  new_block_ids=range(i * blocks, (i + 1) * blocks)))
    started = time.perf_counter()
    result = runner.execute(worker_pb2.StepPlan(step_id=1, new_sequences=new, scheduled=sched))
    assert not result.error, result.error
    prefill = time.perf_counter() - started
    decode_plan = [worker_pb2.ScheduledSequence(seq_id=i, num_tokens=1) for i in range(seqs)]
    started = time.perf_counter()
    for step in range(steps):
        result = runner.execute(worker_pb2.StepPlan(step_id=step + 2, scheduled=decode_plan))
        assert not result.error, result.error
    decode = time.perf_counter() - started
    runner.execute(worker_pb2.StepPlan(step_id=steps + 2, freed_seq_ids=range(seqs)))
    return {"prefill_tokens_per_s": round(seqs * prompt / prefill, 1), "decode_tokens_per_s": round(seqs * steps / decode, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "docs/performance/lora.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = build(Path(tmp), 4, args.rank)
        blocks = args.seqs * -(-(args.prompt + args.steps + 1) // BLOCK)
        common = dict(model=str(Path(tmp) / "base"), device=args.device, block_size=BLOCK,
                      num_gpu_blocks_override=blocks, max_num_seqs=args.seqs)
        off = ModelRunner(WorkerConfig(**common))
        on = ModelRunner(WorkerConfig(**common, enable_lora=True, max_loras=4, max_lora_rank=args.rank))
        settings = [("base, LoRA off", off, []), ("LoRA on, 0 adapters", on, []),
                    ("1 adapter", on, adapters[:1]), ("4 adapters", on, adapters)]
        run(on, 4, 8, 2, adapters)  # warm-up: adapters read, slots filled, kernels compiled
        results = {}
        for _ in range(args.repeats):
            for name, runner, chosen in settings:
                got = run(runner, args.seqs, args.prompt, args.steps, chosen)
                best = results.setdefault(name, got)
                for key, value in got.items():
                    best[key] = max(best[key], value)
        for name, best in results.items():
            print(f"{name:22s} prefill {best['prefill_tokens_per_s']:9.1f} tok/s   "
                  f"decode {best['decode_tokens_per_s']:8.1f} tok/s", flush=True)
    record = {"what": "tokens/s of one worker, 4 settings on one batch (benchmarks/lora.py)",
              "model": "random Llama, hidden 512, 8 layers, vocab 4096; rank-16 adapters on q,k,v,o,gate,up,down",
              "device": args.device, "torch_threads": torch.get_num_threads(), "seqs": args.seqs,
              "prompt_tokens": args.prompt, "decode_steps": args.steps, "repeats (best kept)": args.repeats,
              "load_average_1min": os.getloadavg()[0], "results": results,
              "date": time.strftime("%Y-%m-%d"), "note": "a shared machine: other jobs ran at the same time"}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
