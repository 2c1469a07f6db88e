"""`pagedserve bench compare` (and `compare-hf`): one workload through several systems on the same
model directory, one system at a time, then a table of output tokens/s, TTFT and TPOT with
pagedserve's ratio to each, a JSON file and a PNG chart.

Servers (pagedserve, vLLM) get the workload from the `bench serve` client; transformers runs it
through its own `generate` in this process. The machine's load average is recorded around each
run: on a shared machine the numbers of one run are only comparable with each other."""
from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from pagedserve.launcher import free_port

from .chart import draw
from .datasets import BenchRequest
from .hf import load_model, run_static_batches
from .metrics import summarize
from .serve import build_requests, percentiles_of, run_workload
from .systems import cores, cpu_seconds, pagedserve_command, server_process, vllm_command, vllm_env

PER_REQUEST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "errors")
SERVERS = {"pagedserve", "vllm", "vllm-default"}
TRANSFORMERS = {"transformers", "transformers-sequential"}


def served_name(args) -> str:
    return args.served_model_name or Path(args.model).resolve().name


def serve_and_run(args, system: str, requests: list[BenchRequest]) -> dict:
    port = free_port()
    name = served_name(args)
    log_path = Path(args.log_dir) / f"{system}.log"
    if system == "pagedserve":
        cmd, env = pagedserve_command(args.model, name, port, args.server_arg), {}
    else:
        cmd, env = vllm_command(args.vllm_python, args.model, name, port), vllm_env(system == "vllm")
    with server_process(cmd, port, log_path, args.startup_timeout, env) as (root, pid):
        before, client_before = cpu_seconds(pid), time.process_time()
        outputs, duration = asyncio.run(run_workload(root, name, requests, args.max_concurrency, args.request_rate,
                                                     args.seed, args.disable_tqdm))
        after, client = cpu_seconds(pid), time.process_time() - client_before
    # Who used the cores during the run: the model's process(es) and everything around them.
    used = {label: round(after[label] - before.get(label, 0.0), 2) for label in after}
    return summarize(outputs, duration, percentiles_of(args)) | {"cpu_seconds": used | {"bench client": round(client, 2)}}


def hf_run(args, system: str, requests: list[BenchRequest]) -> dict:
    model = load_model(args.model)
    batch_size = 1 if system == "transformers-sequential" else args.hf_batch_size
    with tqdm(total=len(requests), desc=system, disable=args.disable_tqdm) as bar:
        cpu_before = time.process_time()
        outputs, duration = run_static_batches(model, requests, batch_size, bar)
        cpu = time.process_time() - cpu_before  # every thread of this process: the model's own
    return summarize(outputs, duration, percentiles_of(args)) | {"cpu_seconds": {"transformers": round(cpu, 2)}}


def settings(args, system: str) -> str:
    return {
        "pagedserve": "pagedserve serve " + " ".join(args.server_arg) if args.server_arg else "pagedserve serve (defaults)",
        "vllm": f"vLLM CPU, OMP threads bound to all {cores()} cores",
        "vllm-default": "vLLM CPU, its default settings",
        "transformers": f"transformers generate, static batches of {args.hf_batch_size}, left padding",
        "transformers-sequential": "transformers generate, one request at a time",
    }[system]


def run_system(args, system: str, requests: list[BenchRequest]) -> dict:
    print(f"--- {system}: {settings(args, system)}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.time()
    result = (serve_and_run if system in SERVERS else hf_run)(args, system, requests)
    summary = {k: v for k, v in result.items() if k not in PER_REQUEST_KEYS}
    if "cpu_seconds" in summary:
        # Less sensitive than tokens/s to what else runs on a shared machine: the work each token cost.
        server_cpu = sum(v for k, v in summary["cpu_seconds"].items() if k != "bench client")
        summary["output_tokens_per_cpu_second"] = summary["total_output_tokens"] / max(server_cpu, 1e-9)
        print(f"    CPU seconds during the run: {summary['cpu_seconds']}", flush=True)
    summary |= {"settings": settings(args, system), "started": datetime.fromtimestamp(started).isoformat(),
                "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                "errors": [e for e in result["errors"] if e][:5]}
    print(f"    {summary['output_throughput']:.1f} output tok/s, {summary['completed']} completed, "
          f"median TTFT {summary['median_ttft_ms']:.0f} ms, median TPOT {summary['median_tpot_ms']:.1f} ms",
          flush=True)
    return summary


def check_systems(args) -> list[str]:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SERVERS | TRANSFORMERS]
    if unknown or not systems:
        raise SystemExit(f"bench: unknown systems {unknown}; choose from {sorted(SERVERS | TRANSFORMERS)}")
    if any(s.startswith("vllm") for s in systems) and not Path(args.vllm_python).exists():
        raise SystemExit(f"bench: {args.vllm_python} does not exist: run `make peers` first (it installs "
                         "vLLM's CPU build in .peers/vllm), or leave vllm out of --systems")
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"bench: {args.model} is not a Hugging Face model directory (no config.json)")
    return systems


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": cores(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def format_table(systems: dict[str, dict]) -> str:
    ours = systems.get("pagedserve", {}).get("output_throughput")
    header = (f"{'system':<26}{'output tok/s':>13}{'req/s':>8}{'median TTFT ms':>16}{'median TPOT ms':>16}"
              f"{'pagedserve x':>14}{'tok/CPU-s':>11}")
    lines = [header, "-" * len(header)]
    for name, s in systems.items():
        ratio = f"{ours / s['output_throughput']:.2f}" if ours and s["output_throughput"] else "-"
        lines.append(f"{name:<26}{s['output_throughput']:>13.1f}{s['request_throughput']:>8.2f}"
                     f"{s['median_ttft_ms']:>16.0f}{s['median_tpot_ms']:>16.1f}{ratio:>14}"
                     f"{s.get('output_tokens_per_cpu_second', float('nan')):>11.1f}")
    return "\n".join(lines)


def ratios(systems: dict[str, dict]) -> dict[str, float]:
    ours = systems.get("pagedserve", {}).get("output_throughput")
    return {f"pagedserve/{n}": ours / s["output_throughput"] for n, s in systems.items()
            if ours and n != "pagedserve" and s["output_throughput"]}


def workload(args, requests: list[BenchRequest]) -> dict:
    return {"dataset_name": args.dataset_name, "num_prompts": len(requests), "seed": args.seed,
            "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio, "max_concurrency": args.max_concurrency,
            "request_rate": args.request_rate, "prompt_tokens": sum(r.prompt_len for r in requests),
            "output_tokens": sum(r.output_len for r in requests),
            "prompt_len_range": [min(r.prompt_len for r in requests), max(r.prompt_len for r in requests)],
            "output_len_range": [min(r.output_len for r in requests), max(r.output_len for r in requests)]}


def main(args) -> int:
    systems = check_systems(args)
    requests = build_requests(args)
    results, broken = {}, {}
    for path in (args.result_filename, args.chart):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    for system in systems:
        try:
            results[system] = run_system(args, system, requests)
        except RuntimeError as e:  # a server that would not start: the others still run
            print(f"    {system} failed: {e}", flush=True)
            broken[system] = str(e)
        # Written after every system: a long run stopped halfway keeps what it measured.
        report = {"date": datetime.now().isoformat(timespec="seconds"), "model": args.model,
                  "workload": workload(args, requests), "machine": machine(), "systems": results,
                  "ratios": ratios(results), "failed_systems": broken}
        Path(args.result_filename).write_text(json.dumps(report, indent=2))
    print(format_table(results))
    load = workload(args, requests)
    if results:
        draw(results, f"{served_name(args)}, {load['num_prompts']} requests, prompts {load['prompt_len_range']}, "
                      f"outputs {load['output_len_range']} tokens, {cores()} cores", args.chart)
    print(f"wrote {args.result_filename}" + (f" and {args.chart}" if results else ""))
    failed = sum(s["failed"] for s in results.values())
    return 1 if failed or broken else 0

