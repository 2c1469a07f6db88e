"""A benchmark run's outputs summed up under vLLM's `bench serve` result keys, and printed as its
table. Latencies are in milliseconds, throughputs per second of the whole run. A latency no
request measured (TTFT, TPOT, ITL of plain requests) is None."""
from __future__ import annotations

import numpy as np

from .client import RequestOutput

LATENCIES = {  # key stem -> title in the printed table
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def latency_samples(outputs: list[RequestOutput]) -> dict[str, list[float]]:
    done = [o for o in outputs if o.success]
    streamed = [o for o in done if o.streamed]  # plain requests get all their tokens at once
    return {
        "ttft": [o.ttft for o in streamed],
        # TPOT leaves the first token out; a one-token request has none.
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in streamed if o.output_tokens > 1],
        "itl": [x for o in streamed for x in o.itl],
        "e2el": [o.latency for o in done],
    }


def latency_stats(seconds: list[float], percentiles) -> dict[str, float | None]:
    """mean, median, std and pN of the samples in ms, under those keys; all None without samples."""
    if not seconds:
        return dict.fromkeys(["mean", "median", "std", *(f"p{p:g}" for p in percentiles)])
    ms = np.asarray(seconds) * 1000
    stats = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    return stats | {f"p{p:g}": float(np.percentile(ms, p)) for p in percentiles}


def summarize(outputs: list[RequestOutput], duration: float, percentiles=(99,)) -> dict:
    done = [o for o in outputs if o.success]
    input_tokens = sum(o.prompt_len for o in done)
    output_tokens = sum(o.output_tokens for o in done)
    result = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for name, seconds in latency_samples(outputs).items():
        for stat, value in latency_stats(seconds, percentiles).items():
            result[f"{stat}_{name}_ms"] = value
    result["input_lens"] = [o.prompt_len for o in outputs]
    result["output_lens"] = [o.output_tokens for o in outputs]
    result["ttfts"] = [o.ttft if o.streamed else None for o in outputs]
    result["itls"] = [o.itl for o in outputs]
    result["errors"] = [o.error for o in outputs]
    return result


def format_ms(value: float | None, digits: int = 2) -> str:
    """A latency for a table: "-" where none was measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_result(result: dict, percentiles=(99,)) -> str:
    rows = [
        ("Successful requests:", result["completed"]),
        ("Failed requests:", result["failed"]),
        ("Benchmark duration (s):", f"{result['duration']:.2f}"),
        ("Total input tokens:", result["total_input_tokens"]),
        ("Total generated tokens:", result["total_output_tokens"]),
        ("Request throughput (req/s):", f"{result['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{result['output_throughput']:.2f}"),
        ("Total token throughput (tok/s):", f"{result['total_token_throughput']:.2f}"),
    ]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{name:<40}{value:<10}" for name, value in rows]
    for name, title in LATENCIES.items():
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        stats = [("Mean", "mean"), ("Median", "median")] + [(f"P{p:g}", f"p{p:g}") for p in percentiles]
        for label, prefix in stats:
            lines.append(f"{f'{label} {name.upper()} (ms):':<40}{format_ms(result[f'{prefix}_{name}_ms']):<10}")
    lines.append("=" * 50)
    return "\n".join(lines)
