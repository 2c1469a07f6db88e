"""One user through the whole server: `pagedserve serve` without and with n-gram speculation, both
up at once, each grounded prompt of benchmarks/spec_decode.py (and its random ones) streamed one at
a time over /v1/completions (token-id prompts, greedy, 128 tokens), the two servers alternating
(off, spec, spec, off, ...). Time per output token is the time from the first streamed token to
the last over the tokens after the first, as the client sees it (with speculation, several
tokens arrive in one chunk). The outputs must be identical. Prints the table and writes the JSON.

    .venv/bin/python benchmarks/spec_decode_served.py [--repeats 2] [--out docs/performance/spec_decode_served.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

from openai import OpenAI
from transformers import AutoTokenizer

from pagedserve.entrypoints.bench.systems import free_port, pagedserve_command, server_process

ROOT = Path(__file__).resolve().parent.parent


def load_spec_decode():
    """benchmarks/spec_decode.py, for its prompts, config and summary (benchmarks is no package)."""
    spec = importlib.util.spec_from_file_location("spec_decode", ROOT / "benchmarks" / "spec_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stream_one(client: OpenAI, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion: its text, token count and client-side TPOT (ms)."""
    first = last = None
    text, tokens = [], 0
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            text.append(chunk.choices[0].text)
    return {"text": "".join(text), "num_output": tokens,
            "tpot_ms": (last - first) * 1e3 / max(tokens - 1, 1) if first else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="runs per server, alternating; the fastest counts")
    p.add_argument("--out", default=str(ROOT / "docs" / "performance" / "spec_decode_served.json"))
    p.add_argument("--note", default="2 cores shared with other jobs: timings are noisy")
    args = p.parse_args()
    sd = load_spec_decode()
    spec = sd.speculative_config(args.k, None)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = {**sd.grounded_prompts(tokenizer), **sd.random_prompts(tokenizer.vocab_size)}
    logs = ROOT / "bench-results" / "spec-served-logs"
    with ExitStack() as stack:
        clients = {}
        for mode, extra in ((None, []), (spec, ["--speculative-config", spec])):
            port = free_port()
            cmd = pagedserve_command(args.model, "m", port, extra)
            root, _ = stack.enter_context(server_process(cmd, port, logs / f"{'spec' if mode else 'off'}.log", 600.0))
            clients[mode] = OpenAI(base_url=f"{root}/v1", api_key="none", timeout=600)
            stream_one(clients[mode], prompts["random 0"][:16], 8)  # warm-up
        rows = []
        load_before = os.getloadavg()
        for name, prompt in prompts.items():
            runs = {None: [], spec: []}
            for i in range(args.repeats):
                for mode in ((None, spec) if i % 2 == 0 else (spec, None)):
                    runs[mode].append(stream_one(clients[mode], prompt, args.max_tokens))
            off, on = (min(runs[m], key=lambda r: r["tpot_ms"]) for m in (None, spec))
            assert on["text"] == off["text"], f"{name}: outputs differ with speculation"
            row = {"prompt": name, "grounded": not name.startswith("random"), "prompt_tokens": len(prompt),
                   "output_tokens": off["num_output"], "tpot_ms_off": off["tpot_ms"], "tpot_ms_spec": on["tpot_ms"],
                   "speedup": off["tpot_ms"] / on["tpot_ms"]}
            rows.append(row)
            print(f"{name:14s} out {row['output_tokens']:4d}  TPOT off {row['tpot_ms_off']:6.1f} ms  "
                  f"spec {row['tpot_ms_spec']:6.1f} ms  x{row['speedup']:.2f}", flush=True)
    summary = sd.summarize(rows)
    for group, row in summary.items():
        print(f"{group:14s} TPOT off {row['tpot_ms_off']:6.1f} ms  spec {row['tpot_ms_spec']:6.1f} ms  "
              f"x{row['speedup']:.2f}  ({row['prompts']} prompts)", flush=True)
    report = {"benchmark": "spec_decode_served", "model": Path(args.model).name, "speculative_config": json.loads(spec),
              "max_tokens": args.max_tokens, "cpu_flags": sd.cpu_flags(), "load_avg_before": load_before,
              "load_avg_after": os.getloadavg(), "note": args.note, "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
