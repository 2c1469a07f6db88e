"""`pagedserve bench serve`: sends a workload to an OpenAI-compatible server (pagedserve, vLLM,
...) through /v1/completions with ignore_eos, streamed (or plain with --no-stream), and reports
vLLM's serving metrics."""
from __future__ import annotations

import asyncio
import json
import math
import time
from datetime import datetime

import httpx
import numpy as np
from tqdm.asyncio import tqdm

from .client import RequestOutput, send
from .datasets import BenchRequest, jsonl_requests, random_requests, vocab_size_of
from .metrics import format_result, summarize


def json_rate(request_rate: float) -> float | str:
    """The rate as JSON can hold it: "inf" (vLLM's bench writes the same) for all at once, since
    strict JSON parsers refuse Python's `Infinity`."""
    return "inf" if math.isinf(request_rate) else request_rate


def arrival_gaps(num: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: none at an infinite rate, otherwise a Poisson process."""
    if math.isinf(request_rate):
        return [0.0] * num
    return np.random.default_rng(seed).exponential(1.0 / request_rate, size=num).tolist()


def api_url(base_url: str, path: str) -> str:
    """vLLM's convention: --base-url is the server's root; an URL ending in /v1 (the openai SDK's
    convention) is taken as well."""
    root = base_url.rstrip("/").removesuffix("/v1")
    return f"{root}/{path.lstrip('/')}"


async def check_server(client: httpx.AsyncClient, base_url: str) -> None:
    url = api_url(base_url, "/v1/models")
    try:
        reply = await client.get(url, timeout=10)
    except httpx.HTTPError as e:
        raise SystemExit(f"bench serve: cannot reach {url}: {e}") from None
    if reply.status_code != 200:
        raise SystemExit(f"bench serve: {url} answered HTTP {reply.status_code}: {reply.text[:300]}")


async def run_workload(base_url: str, model: str, requests: list[BenchRequest], max_concurrency: int | None = None,
                       request_rate: float = math.inf, seed: int = 0, disable_tqdm: bool = False,
                       api_key: str | None = None, endpoint: str = "/v1/completions",
                       stream: bool = True) -> tuple[list[RequestOutput], float]:
    """All requests (streamed, or plain ones), each sent after its arrival gap and while fewer
    than max_concurrency are in flight; returns their outputs in request order and the run's
    duration in seconds."""
    limit = max_concurrency or len(requests)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), headers=headers,
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:
        await check_server(client, base_url)
        gate = asyncio.Semaphore(limit)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="requests")

        tokens = 0

        async def one(request: BenchRequest) -> RequestOutput:
            nonlocal tokens
            async with gate:
                out = await send(client, api_url(base_url, endpoint), model, request, stream)
            tokens += out.output_tokens
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} output tok/s", refresh=False)
            bar.update(1)
            return out

        tasks = []
        start = time.perf_counter()
        for request, gap in zip(requests, arrival_gaps(len(requests), request_rate, seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(request)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(outputs), duration


def build_requests(args) -> list[BenchRequest]:
    if args.dataset_name == "jsonl":
        if not args.dataset_path:
            raise SystemExit("bench serve: --dataset-name jsonl needs --dataset-path FILE.jsonl")
        return jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len)
    return random_requests(args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
                           vocab_size_of(getattr(args, "tokenizer", None) or args.model), args.seed)


def percentiles_of(args) -> tuple[float, ...]:
    return tuple(float(p) for p in args.metric_percentiles.split(","))


def result_filename(args) -> str:
    if args.result_filename:
        return args.result_filename
    model = args.model.rstrip("/").rsplit("/", 1)[-1]
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    return f"pagedserve-{args.request_rate}qps{concurrency}-{model}-{datetime.now():%Y%m%d-%H%M%S}.json"


def main(args) -> int:
    requests = build_requests(args)
    outputs, duration = asyncio.run(run_workload(
        args.base_url, args.served_model_name or args.model, requests, args.max_concurrency, args.request_rate,
        args.seed, args.disable_tqdm, args.api_key, args.endpoint, args.stream))
    percentiles = percentiles_of(args)
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai", "base_url": args.base_url,
        "model_id": args.model, "num_prompts": len(requests), "request_rate": json_rate(args.request_rate),
        "max_concurrency": args.max_concurrency, "stream": args.stream, **summarize(outputs, duration, percentiles),
    }
    print(format_result(result, percentiles))
    failures = [e for e in result["errors"] if e]
    if failures:
        print(f"{len(failures)} requests failed; the first: {failures[0]}")
    if args.save_result:
        path = result_filename(args)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"saved {path}")
    return 0 if not failures else 1
