"""Time per output token at concurrency 1, with and without speculative decoding (n-gram, or a
draft model with --draft-model DIR), on input-grounded prompts (repeat or edit a given text,
rewrite a given code file) and on random ones. With --concurrency N...: output throughput with N
requests at once instead (grounded prompts with drafts against none; random prompts: for n-gram
with a 32-gram minimum, which nothing matches, the proposer's cost where it proposes nothing; for
a draft model, its drafts on text it was not given).

    .venv/bin/python benchmarks/spec_decode.py [--model models/SmolLM2-135M-Instruct] [--k 4]
        [--draft-model DIR] [--max-tokens 128] [--concurrency 16 64]
        [--out docs/performance/spec_decode.json]

In one process, the real scheduler policy (scheduler/scheduler.py, its n-gram proposer) drives the
real ModelRunner, one request at a time, greedy: what a single user sees per token, minus the
gRPC hops (the same per step in both modes; speculation takes fewer steps, so this understates its
gain slightly). Each prompt runs without and with speculation back to back, so host noise hits
both; the outputs must be token-identical. Prints a table and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.request import SamplingLimits
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.validation import with_defaults
from pagedserve.worker.config import WorkerConfig
from pagedserve.worker.model_runner import ModelRunner

ROOT = Path(__file__).resolve().parent.parent

PARAGRAPH = ("The harbour town wakes before dawn. Fishing boats leave the quay one by one, their lamps "
             "swinging over the black water, while the bakers on Mill Street light their ovens and the "
             "first trams rattle down towards the market. By seven the fish auction is loud with bids, "
             "gulls circle the crates, and the cafes fill with workers who have been up for hours.")


TYPOS = {"before": "befor", "quay": "qauy", "market": "markett", "workers": "wrokers"}

SETTINGS = {"server": {"host": "127.0.0.1", "port": 8000, "workers": 4,
                       "models": ["SmolLM2-135M-Instruct", "Qwen3-0.6B"],
                       "cache": {"block_size": 16, "num_blocks": 4096, "prefix_caching": True}}}


def grounded_prompts(tokenizer) -> dict[str, list[int]]:
    """Chat prompts that hand the model a text, code or data to repeat or edit, and one raw code
    completion (the first half of a function of this repository, continued). The first three
    were asked of SmolLM2-135M before the others; it answers "edit text" and "edit code" with a
    description rather than an edit (few of its tokens are in the prompt), so they stay as the
    workloads where n-gram drafts find little."""
    code = (ROOT / "scheduler" / "ngram_proposer.py").read_text()
    start = code.index("def propose_ngram")
    function = code[start:]
    typos = PARAGRAPH
    for right, wrong in TYPOS.items():
        typos = typos.replace(right, wrong)
    asks = {
        "repeat text": f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
        "edit text": f"Rewrite this text in the past tense, changing nothing else:\n\n{PARAGRAPH}",
        "edit code": f"Rename the variable `seq` to `ids` in this Python function and output the whole "
                     f"function:\n\n```python\n{function}```",
        "fix typos": f"Fix the spelling mistakes in this text and output the corrected text:\n\n{typos}",
        "json to yaml": "Convert this JSON to YAML:\n\n" + json.dumps(SETTINGS, indent=2),
        "add docstring": f"Add a docstring to this Python function and output the whole function:\n\n"
                         f"```python\n{function[:900]}```",
    }
    chat = {name: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False) for name, text in asks.items()}
    prompts = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in chat.items()}
    prompts["complete code"] = tokenizer(code[:start] + function[:len(function) // 2],
                                         add_special_tokens=False)["input_ids"]
    return prompts


def random_prompts(vocab_size: int, n: int = 2, length: int = 128) -> dict[str, list[int]]:
    rng = random.Random(0)
    return {f"random {i}": [rng.randrange(vocab_size) for _ in range(length)] for i in range(n)}


def run_one(runner: ModelRunner, prompt: list[int], max_tokens: int, spec: str | None) -> dict:
    """One request alone, greedy: its tokens, decode time per output token, and speculation's counts."""
    runner.batch.clear()
    config = SchedulerConfig(num_blocks=runner.num_blocks, block_size=runner.config.block_size,
                             max_model_len=runner.loaded.max_model_len, max_num_batched_tokens=2048,
                             speculative_config=spec)
    s = Scheduler(config)
    params = with_defaults(pb.SamplingParams(temperature=0, max_tokens=max_tokens))
    request = s.add_request("r", prompt, params, SamplingLimits.of(params, frozenset(runner.loaded.eos_token_ids)))
    first = None
    while s.has_work():
        s.update(runner.execute(s.schedule()))
        if first is None:
            first = time.perf_counter()  # the prefill step is done: decoding starts
    end = time.perf_counter()
    out = request.sequences[0].output_ids()
    sp = s.speculator
    return {"tokens": out, "num_output": len(out), "tpot_ms": (end - first) * 1e3 / max(len(out) - 1, 1),
            "steps": s.next_step_id, "drafts": sp.num_drafts, "draft_tokens": sp.num_draft_tokens,
            "accepted": sp.num_accepted_tokens}


def run_many(runner: ModelRunner, prompts: list[list[int]], max_tokens: int, spec: str | None) -> dict:
    """All prompts at once, greedy, ignore_eos: output tokens per second from the first step to the
    last (prefills included), the outputs and speculation's counts."""
    runner.batch.clear()
    config = SchedulerConfig(num_blocks=runner.num_blocks, block_size=runner.config.block_size,
                             max_model_len=runner.loaded.max_model_len, max_num_batched_tokens=2048,
                             speculative_config=spec)
    s = Scheduler(config)
    params = with_defaults(pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    limits = SamplingLimits.of(params, frozenset(runner.loaded.eos_token_ids))
    requests = [s.add_request(f"r{i}", p, params, limits) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    while s.has_work():
        s.update(runner.execute(s.schedule()))
    elapsed = time.perf_counter() - start
    outs = [r.sequences[0].output_ids() for r in requests]
    sp = s.speculator
    return {"tokens": outs, "tokens_per_s": sum(map(len, outs)) / elapsed, "seconds": elapsed,
            "steps": s.next_step_id, "draft_tokens": sp.num_draft_tokens, "accepted": sp.num_accepted_tokens,
            "preemptions": s.num_preemptions}


def speculative_config(k: int, draft_model: str | None) -> str:
    """The --speculative-config this benchmark measures: n-gram, or the draft model at draft_model."""
    if draft_model:
        return json.dumps({"method": "draft_model", "model": draft_model, "num_speculative_tokens": k})
    return json.dumps({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2})


def throughput(runner: ModelRunner, prompts: dict, concurrency: list[int], max_tokens: int, spec: str) -> list[dict]:
    grounded = [p for name, p in prompts.items() if not name.startswith("random")]
    rng = random.Random(1)
    vocab = runner.loaded.vocab_size
    no_match = no_match_config(spec)
    workloads = {"grounded": (grounded, spec), "no match": (None, no_match)}
    rows = []
    for n in concurrency:
        for name, (base, spec) in workloads.items():
            batch = ([base[i % len(base)] for i in range(n)] if base is not None
                     else [[rng.randrange(vocab) for _ in range(128)] for _ in range(n)])
            off = run_many(runner, batch, max_tokens, None)
            on = run_many(runner, batch, max_tokens, spec)
            assert on["tokens"] == off["tokens"], f"{name} x{n}: outputs differ with speculation"
            row = {"workload": name, "concurrency": n, "speculative_config": json.loads(spec),
                   "tokens_per_s_off": off["tokens_per_s"], "tokens_per_s_spec": on["tokens_per_s"],
                   "speedup": on["tokens_per_s"] / off["tokens_per_s"], "steps_off": off["steps"],
                   "steps_spec": on["steps"], "draft_tokens": on["draft_tokens"], "accepted_tokens": on["accepted"],
                   "preemptions": [off["preemptions"], on["preemptions"]]}
            rows.append(row)
            print(f"{name:9s} x{n:3d}  off {row['tokens_per_s_off']:7.1f} tok/s  spec {row['tokens_per_s_spec']:7.1f} "
                  f"tok/s  x{row['speedup']:.2f}  drafts {row['draft_tokens']} accepted {row['accepted_tokens']}  "
                  f"steps {row['steps_off']} -> {row['steps_spec']}", flush=True)
    return rows


def no_match_config(spec: str, n: int = 32) -> str:
    """The n-gram config with n-grams of exactly n tokens, which random prompts do not match: the
    proposer's cost where it proposes nothing (a draft model's config is returned unchanged). With
    n >= the tokens generated, no match is possible at all: the last n tokens would have to occur
    earlier, so the output would repeat with some period p over n + p > n tokens of it."""
    value = json.loads(spec)
    if value["method"] != "ngram":
        return spec
    return json.dumps({**value, "prompt_lookup_max": n, "prompt_lookup_min": n})


def one_user_cases(prompts: dict, spec: str, max_tokens: int) -> list[tuple[str, list[int], str]]:
    """(name, prompt, speculative config) at concurrency 1: every prompt with `spec`, and for n-gram
    the random prompts again with nothing to match (the model often repeats itself on random
    prompts, which `spec` then predicts: that row shows the gain, the no-match row the cost)."""
    cases = [(name, prompt, spec) for name, prompt in prompts.items()]
    no_match = no_match_config(spec, max(32, max_tokens))
    if no_match != spec:
        cases += [(f"{name} (no match)", prompt, no_match) for name, prompt in prompts.items()
                  if name.startswith("random")]
    return cases


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per group (grounded, random, no match): the decode time of all its prompts over their decoded
    tokens, off and with speculation (a prompt weighs by its tokens, as a user's wait does)."""
    groups = {}
    for row in rows:
        group = "no match" if row["prompt"].endswith("(no match)") else "grounded" if row["grounded"] else "random"
        groups.setdefault(group, []).append(row)
    summary = {}
    for group, members in groups.items():
        tokens = sum(r["output_tokens"] - 1 for r in members)
        off = sum(r["tpot_ms_off"] * (r["output_tokens"] - 1) for r in members) / tokens
        spec = sum(r["tpot_ms_spec"] * (r["output_tokens"] - 1) for r in members) / tokens
        summary[group] = {"prompts": len(members), "output_tokens": tokens + len(members),
                          "tpot_ms_off": off, "tpot_ms_spec": spec, "speedup": off / spec}
    return summary


def cpu_flags() -> str:
    flags = next((line.split(":", 1)[1].split() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Flags")), [])
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return " ".join(f for f in flags if f in wanted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--draft-model", default=None, help="a draft model's directory (method draft_model; "
                   "default: n-gram drafts)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating; the fastest counts")
    p.add_argument("--concurrency", type=int, nargs="*", default=[],
                   help="measure throughput with this many requests at once instead (e.g. 16 64)")
    p.add_argument("--out", default=str(ROOT / "docs" / "performance" / "spec_decode.json"))
    p.add_argument("--note", default="2 cores shared with several other agents' jobs: timings are noisy",
                   help="the machine's condition, written into the report")
    args = p.parse_args()
    spec = speculative_config(args.k, args.draft_model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    runner = ModelRunner(WorkerConfig(model=args.model, kv_cache_memory_bytes=256 << 20, max_model_len=2048,
                                       num_threads=args.threads or None, speculative_config=spec))
    prompts = {**grounded_prompts(tokenizer), **random_prompts(runner.loaded.vocab_size)}
    run_one(runner, prompts["random 0"][:16], 8, None)  # warm-up
    if args.concurrency:
        load_before = os.getloadavg()
        rows = throughput(runner, prompts, args.concurrency, args.max_tokens, spec)
        report = {"benchmark": "spec_decode_throughput", "commit": subprocess.run(
                      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
                  "model": Path(args.model).name, "max_tokens": args.max_tokens, "device": "cpu",
                  "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                  "cpu_flags": cpu_flags(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                  "note": args.note, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    rows = []
    load_before = os.getloadavg()
    for name, prompt, case_spec in one_user_cases(prompts, spec, args.max_tokens):
        runs = {None: [], case_spec: []}
        for i in range(args.repeats):  # off, on, on, off, ...: a slow spell of the host hits both
            for mode in ((None, case_spec) if i % 2 == 0 else (case_spec, None)):
                runs[mode].append(run_one(runner, prompt, args.max_tokens, mode))
        off, on = (min(runs[m], key=lambda r: r["tpot_ms"]) for m in (None, case_spec))
        assert on["tokens"] == off["tokens"], f"{name}: outputs differ with speculation"
        row = {"prompt": name, "grounded": not name.startswith("random"), "prompt_tokens": len(prompt),
               "speculative_config": json.loads(case_spec),
               "output_tokens": off["num_output"], "tpot_ms_off": off["tpot_ms"], "tpot_ms_spec": on["tpot_ms"],
               "speedup": off["tpot_ms"] / on["tpot_ms"], "steps_off": off["steps"], "steps_spec": on["steps"],
               "acceptance_rate": on["accepted"] / on["draft_tokens"] if on["draft_tokens"] else 0.0,
               "mean_accepted_length": 1 + on["accepted"] / on["drafts"] if on["drafts"] else 1.0,
               "draft_tokens": on["draft_tokens"], "accepted_tokens": on["accepted"]}
        rows.append(row)
        print(f"{name:12s} out {row['output_tokens']:4d}  TPOT off {row['tpot_ms_off']:6.1f} ms  spec "
              f"{row['tpot_ms_spec']:6.1f} ms  x{row['speedup']:.2f}  acceptance {row['acceptance_rate']:.2f}  "
              f"mean accepted length {row['mean_accepted_length']:.2f}  steps {row['steps_off']} -> {row['steps_spec']}",
              flush=True)
    summary = summarize(rows)
    for group, row in summary.items():
        print(f"{group:12s} TPOT off {row['tpot_ms_off']:6.1f} ms  spec {row['tpot_ms_spec']:6.1f} ms  "
              f"x{row['speedup']:.2f}  ({row['prompts']} prompts, {row['output_tokens']} tokens)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {"benchmark": "spec_decode", "commit": commit, "model": Path(args.model).name, "summary": summary,
              "speculative_config": json.loads(spec), "max_tokens": args.max_tokens, "concurrency": 1,
              "device": "cpu", "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cpu_flags": cpu_flags(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "note": args.note, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
