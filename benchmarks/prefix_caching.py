"""Time to first token with and without prefix caching: 16 chat requests that share a long system
prompt (a document a team asks questions about), each served by its own `pagedserve serve`.

    .venv/bin/python benchmarks/prefix_caching.py [--model DIR] [--requests 16] [--system-tokens 500]

Prints TTFT per setting and their ratio, and writes bench-results/prefix_caching.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import grpc
from openai import OpenAI
from tqdm import tqdm
from transformers import AutoTokenizer

from pagedserve.entrypoints.local_server import LocalServer, serve_args
from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pbgrpc

ROOT = Path(__file__).resolve().parent.parent


def system_prompt(tokenizer, num_tokens: int) -> str:
    sentences = [f"Clause {i}: the supplier delivers batch {i} to warehouse {i % 7} within "
                 f"{3 + i % 5} days, or pays a penalty of {10 + i} euros per day." for i in range(400)]
    ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids)


def ttft(client: OpenAI, model: str, system: str, question: str) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, temperature=0, max_tokens=4, stream=True,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


def run(model_dir: str, caching: bool, system: str, questions: list[str]) -> dict:
    with LocalServer(serve_args(model_dir, enable_prefix_caching=caching)) as server:
        client = OpenAI(base_url=server.root_url + "/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        times = [ttft(client, name, system, q) for q in tqdm(questions, desc=f"caching={caching}")]
        with grpc.insecure_channel(server.grpc_address) as channel:
            stats = pbgrpc.SchedulerStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    after_first = times[1:]
    return {"enable_prefix_caching": caching, "ttft_s": times,
            "first_ttft_ms": times[0] * 1e3,
            "mean_ttft_ms_after_first": statistics.mean(after_first) * 1e3,
            "median_ttft_ms_after_first": statistics.median(after_first) * 1e3,
            "prefix_cache_queries": stats.prefix_cache_queries, "prefix_cache_hits": stats.prefix_cache_hits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--result-filename", default=str(ROOT / "bench-results" / "prefix_caching.json"))
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    system = system_prompt(tokenizer, args.system_tokens)
    questions = [f"Question {i}: what does clause {3 * i} say about warehouse {i % 7}?" for i in range(args.requests)]
    results = [run(args.model, caching, system, questions) for caching in (True, False)]
    on, off = results
    print(f"{'prefix caching':>16} {'first TTFT ms':>14} {'mean TTFT ms (rest)':>20} {'median':>8} {'hit rate':>9}")
    for r in results:
        rate = r["prefix_cache_hits"] / max(r["prefix_cache_queries"], 1)
        print(f"{'on' if r['enable_prefix_caching'] else 'off':>16} {r['first_ttft_ms']:14.1f} "
              f"{r['mean_ttft_ms_after_first']:20.1f} {r['median_ttft_ms_after_first']:8.1f} {rate:9.1%}")
    speedup = off["median_ttft_ms_after_first"] / on["median_ttft_ms_after_first"]
    print(f"median TTFT after the first request: {speedup:.2f}x faster with prefix caching")
    out = Path(args.result_filename)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "requests": args.requests,
                               "system_tokens": args.system_tokens, "results": results,
                               "median_ttft_speedup": speedup}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
