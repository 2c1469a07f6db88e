"""`pagedserve bench compare` (and `compare-hf`, `host`): one workload through several systems on
the same model directory, one system at a time, then a table of output tokens/s, TTFT and TPOT with
pagedserve's ratio to each, each process's CPU seconds per 1,000 output tokens, a JSON file and a
PNG chart.

Servers (pagedserve, vLLM, llama.cpp's `llama-server` on a GGUF file) get the workload from the `bench serve` client, once per mode (streamed,
plain), each mode on a freshly started server so that no run finds the other's prompts in its
prefix cache; transformers runs it through its own `generate` in this process. `--hf-overrides`
serves a model of another shape built from --model's config and tokenizer with dummy weights
(`bench host`: the no-op model). `--gguf FILE` has pagedserve serve that GGUF file (with --model as
its tokenizer) and llama.cpp the same one. With `--max-concurrency 1` (`bench one-user`) each
system's median TPOT and TTFT are also given as ratios to pagedserve's (one_user.py). The machine's load average is recorded around each run: on a
shared machine the numbers of one run are only comparable with each other."""
from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from pagedserve.entrypoints.launcher import free_port

from .chart import draw
from .datasets import BenchRequest
from .hf import load_model, run_static_batches
from .metrics import format_ms, summarize
from .model_dir import build_model_dir, parse_overrides
from .serve import build_requests, json_rate, percentiles_of, run_workload
from .one_user import format_one_user, is_one_user, latency_ratios
from .systems import cores, cpu_seconds, llamacpp_command, pagedserve_command, server_process, vllm_command, vllm_env

LLAMACPP_GGUF_DIR = ".peers/gguf"  # where `make gguf` writes
PER_REQUEST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "errors")
SERVERS = {"pagedserve", "vllm", "vllm-default", "llamacpp"}
TRANSFORMERS = {"transformers", "transformers-sequential"}
MODES = ("streamed", "plain")


def served_name(args) -> str:
    return args.served_model_name or Path(args.model).resolve().name


def row_name(system: str, mode: str) -> str:
    """A result's key: the system's name for streamed requests (and transformers), with " (plain)"
    for plain ones."""
    return system if mode != "plain" else f"{system} (plain)"


def dummy_flags(args) -> list[str]:
    return ["--load-format", "dummy"] if args.load_format == "dummy" else []


def batch_flags(args) -> list[str]:
    """The batch limits every server gets, so that a step means the same work in each."""
    flags = []
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name, None) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def dtype_of(args) -> str:
    """The dtype pagedserve and vLLM both serve in (--dtype; a Namespace built by hand may lack it)."""
    return getattr(args, "dtype", None) or "float32"


def llamacpp_gguf(args) -> str:
    """llama.cpp's file: --llamacpp-gguf, else --gguf (the one pagedserve serves), else the f32
    file `make gguf` writes for --model."""
    model = Path(getattr(args, "source_model", args.model)).resolve()
    default = Path(LLAMACPP_GGUF_DIR) / f"{model.name}-f32.gguf"
    return args.llamacpp_gguf or args.gguf or str(default)


def parallel_slots(args) -> int:
    """llama-server's -np: as many slots as requests can be in flight at once."""
    return args.max_concurrency or args.num_prompts


def server_command(args, system: str, port: int) -> tuple[list[str], dict[str, str]]:
    name = served_name(args)
    shared = dummy_flags(args) + batch_flags(args)
    if system == "pagedserve":
        # A GGUF file is served as vLLM does: --model FILE --tokenizer DIR.
        gguf = getattr(args, "gguf", None)  # a Namespace built by hand may lack the peers' flags
        model, tokenizer = (gguf, ["--tokenizer", args.model]) if gguf else (args.model, [])
        dtype = ["--dtype", dtype_of(args)]  # before --server-arg's flags, which win where they repeat it
        return pagedserve_command(model, name, port, tokenizer + shared + dtype + args.server_arg), {}
    if system == "llamacpp":
        return llamacpp_command(args.llamacpp_server, llamacpp_gguf(args), name, port, parallel_slots(args),
                                args.llamacpp_arg), {}
    return vllm_command(args.vllm_python, args.model, name, port, shared, dtype_of(args)), vllm_env(system == "vllm")


def serve_and_run(args, system: str, requests: list[BenchRequest], mode: str) -> dict:
    port = free_port()
    cmd, env = server_command(args, system, port)
    log_path = Path(args.log_dir) / f"{system}-{mode}.log"
    with server_process(cmd, port, log_path, args.startup_timeout, env) as (root, pid):
        before, client_before = cpu_seconds(pid), time.process_time()
        outputs, duration = asyncio.run(run_workload(root, served_name(args), requests, args.max_concurrency,
                                                     args.request_rate, args.seed, args.disable_tqdm,
                                                     stream=mode == "streamed"))
        after, client = cpu_seconds(pid), time.process_time() - client_before
    # Who used the cores during the run: the model's process(es) and everything around them.
    used = {label: round(after[label] - before.get(label, 0.0), 3) for label in after}
    return summarize(outputs, duration, percentiles_of(args)) | {"cpu_seconds": used | {"bench client": round(client, 3)}}


def hf_run(args, system: str, requests: list[BenchRequest], mode: str) -> dict:
    """transformers in this process; `mode` does not apply (a streamer times each of its steps)."""
    model = load_model(args.model)
    batch_size = 1 if system == "transformers-sequential" else args.hf_batch_size
    with tqdm(total=len(requests), desc=system, disable=args.disable_tqdm) as bar:
        cpu_before = time.process_time()
        outputs, duration = run_static_batches(model, requests, batch_size, bar)
        cpu = time.process_time() - cpu_before  # every thread of this process: the model's own
    return summarize(outputs, duration, percentiles_of(args)) | {"cpu_seconds": {"transformers": round(cpu, 2)}}


def settings(args, system: str) -> str:
    dtype = ["--dtype", dtype_of(args)]
    flags = " ".join(dummy_flags(args) + batch_flags(args) + dtype + args.server_arg)
    dummy = " ".join(dummy_flags(args) + batch_flags(args) + dtype)
    gguf = f"--model {Path(args.gguf).name} " if getattr(args, "gguf", None) else ""
    return {
        "pagedserve": f"pagedserve serve {gguf}{flags}".rstrip() if gguf or flags else "pagedserve serve (defaults)",
        "llamacpp": f"llama.cpp llama-server on {Path(llamacpp_gguf(args)).name}, -np {parallel_slots(args)}, "
                    f"{cores()} threads {' '.join(getattr(args, 'llamacpp_arg', []))}".rstrip(),
        "vllm": f"vLLM CPU, OMP threads bound to all {cores()} cores {dummy}".rstrip(),
        "vllm-default": f"vLLM CPU, its default settings {dummy}".rstrip(),
        "transformers": f"transformers generate, static batches of {args.hf_batch_size}, left padding",
        "transformers-sequential": "transformers generate, one request at a time",
    }[system]


def cpu_costs(summary: dict) -> dict:
    """Output tokens per CPU second of the serving processes, and each process's CPU seconds per
    1,000 output tokens: less sensitive than tokens/s to what else runs on a shared machine."""
    tokens = max(summary["total_output_tokens"], 1)
    server_cpu = sum(v for k, v in summary["cpu_seconds"].items() if k != "bench client")
    return {"output_tokens_per_cpu_second": summary["total_output_tokens"] / max(server_cpu, 1e-9),
            "cpu_seconds_per_1k_output_tokens": {k: round(v * 1000 / tokens, 4)
                                                 for k, v in summary["cpu_seconds"].items()}}


def run_system(args, system: str, requests: list[BenchRequest], mode: str) -> dict:
    print(f"--- {row_name(system, mode)}: {settings(args, system)}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.time()
    result = (serve_and_run if system in SERVERS else hf_run)(args, system, requests, mode)
    summary = {k: v for k, v in result.items() if k not in PER_REQUEST_KEYS}
    summary |= cpu_costs(summary)
    print(f"    CPU seconds during the run: {summary['cpu_seconds']}", flush=True)
    summary |= {"system": system, "mode": mode if system in SERVERS else "generate", "settings": settings(args, system),
                "started": datetime.fromtimestamp(started).isoformat(),
                "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                "errors": [e for e in result["errors"] if e][:5]}
    print(f"    {summary['output_throughput']:.1f} output tok/s, {summary['completed']} completed, "
          f"median TTFT {format_ms(summary['median_ttft_ms'], 0)} ms, "
          f"median TPOT {format_ms(summary['median_tpot_ms'], 1)} ms", flush=True)
    return summary


def check_systems(args) -> list[str]:
    systems = [s.strip() for s in (args.systems or default_systems(args)).split(",") if s.strip()]
    unknown = [s for s in systems if s not in SERVERS | TRANSFORMERS]
    if unknown or not systems:
        raise SystemExit(f"bench: unknown systems {unknown}; choose from {sorted(SERVERS | TRANSFORMERS)}")
    if any(s.startswith("vllm") for s in systems) and not Path(args.vllm_python).exists():
        raise SystemExit(f"bench: {args.vllm_python} does not exist: run `make peers` first (it installs "
                         "vLLM's CPU build in .peers/vllm), or leave vllm out of --systems")
    if "llamacpp" in systems:
        check_llamacpp(args)
    if args.gguf and not Path(args.gguf).is_file():
        raise SystemExit(f"bench: --gguf {args.gguf} is not a file: `make gguf` writes the default model's in .peers/gguf")
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"bench: {args.model} is not a Hugging Face model directory (no config.json)")
    if args.load_format == "dummy" and TRANSFORMERS & set(systems):
        raise SystemExit("bench: the transformers systems load real weights: leave them out with --load-format dummy")
    return systems


def check_llamacpp(args) -> None:
    if not Path(args.llamacpp_server).is_file():
        raise SystemExit(f"bench: {args.llamacpp_server} does not exist: run `make peers` first (it builds "
                         "llama.cpp's llama-server in .peers/llama.cpp), or leave llamacpp out of --systems")
    if not Path(llamacpp_gguf(args)).is_file():
        raise SystemExit(f"bench: no GGUF file {llamacpp_gguf(args)} for llama.cpp: run `make gguf`, or give "
                         "--llamacpp-gguf or --gguf")
    if args.load_format == "dummy" or args.hf_overrides:
        raise SystemExit("bench: llama.cpp serves a GGUF file's own weights: leave it out with --load-format dummy "
                         "or --hf-overrides")


def default_systems(args) -> str:
    """`bench host`'s: pagedserve, and vLLM where `make peers` installed it."""
    if Path(args.vllm_python).exists():
        return "pagedserve,vllm"
    print(f"bench: no {args.vllm_python} (`make peers` installs it): pagedserve only", flush=True)
    return "pagedserve"


def check_modes(args) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"bench: --modes takes a comma-separated subset of {','.join(MODES)}, not {args.modes!r}")
    return modes


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": cores(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def ratio_base(rows: dict[str, dict], row: dict) -> dict | None:
    """The pagedserve row a row is measured against: the one of the same mode (transformers:
    streamed)."""
    mode = row["mode"] if row["mode"] in MODES else "streamed"
    return rows.get(row_name("pagedserve", mode))


def format_table(rows: dict[str, dict]) -> str:
    header = (f"{'system':<34}{'output tok/s':>13}{'req/s':>8}{'median TTFT ms':>16}{'median TPOT ms':>16}"
              f"{'p99 TPOT ms':>13}{'pagedserve x':>14}{'tok/CPU-s':>11}")
    lines = [header, "-" * len(header)]
    for name, s in rows.items():
        ours = ratio_base(rows, s)
        ratio = f"{ours['output_throughput'] / s['output_throughput']:.2f}" if ours and s["output_throughput"] else "-"
        lines.append(f"{name:<34}{s['output_throughput']:>13.1f}{s['request_throughput']:>8.2f}"
                     f"{format_ms(s['median_ttft_ms'], 0):>16}{format_ms(s['median_tpot_ms'], 1):>16}"
                     f"{format_ms(s.get('p99_tpot_ms'), 1):>13}{ratio:>14}{s['output_tokens_per_cpu_second']:>11.1f}")
    lines += ["", "CPU seconds per 1,000 output tokens, by process:"]
    for name, s in rows.items():
        costs = "  ".join(f"{label} {v:.3f}" for label, v in s["cpu_seconds_per_1k_output_tokens"].items())
        lines.append(f"{name:<34}{costs}")
    return "\n".join(lines)


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """pagedserve's output tokens/s over each other row's, mode for mode."""
    found = {}
    for name, s in rows.items():
        ours = ratio_base(rows, s)
        if ours and s["system"] != "pagedserve" and s["output_throughput"]:
            found[f"{row_name('pagedserve', s['mode'])}/{name}"] = ours["output_throughput"] / s["output_throughput"]
    return found


def workload(args, requests: list[BenchRequest]) -> dict:
    return {"dataset_name": args.dataset_name, "num_prompts": len(requests), "seed": args.seed,
            "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio, "max_concurrency": args.max_concurrency,
            "request_rate": json_rate(args.request_rate), "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "prompt_tokens": sum(r.prompt_len for r in requests),
            "output_tokens": sum(r.output_len for r in requests),
            "prompt_len_range": [min(r.prompt_len for r in requests), max(r.prompt_len for r in requests)],
            "output_len_range": [min(r.output_len for r in requests), max(r.output_len for r in requests)]}


def runs(systems: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """(system, mode) in run order: a server once per mode, transformers once."""
    return [(system, mode) for system in systems for mode in (modes if system in SERVERS else ["generate"])]


def main(args) -> int:
    systems, modes = check_systems(args), check_modes(args)
    try:
        overrides = parse_overrides(args.hf_overrides)
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    if overrides and args.load_format != "dummy":
        raise SystemExit("bench: --hf-overrides builds a model directory without weights: add --load-format dummy")
    args.source_model = args.model
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        if overrides:
            # A model of the asked shape, served by every system from the same directory.
            source = Path(args.model).resolve()
            args.model = str(build_model_dir(source, Path(tmp) / f"{source.name}-hf-overrides", overrides))
        return compare(args, systems, modes, overrides)


def compare(args, systems: list[str], modes: list[str], overrides: dict) -> int:
    requests = build_requests(args)
    results, broken = {}, {}
    for path in (args.result_filename, args.chart):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    for system, mode in runs(systems, modes):
        try:
            results[row_name(system, mode)] = run_system(args, system, requests, mode)
        except RuntimeError as e:  # a server that would not start: the others still run
            print(f"    {system} failed: {e}", flush=True)
            broken[row_name(system, mode)] = str(e)
        # Written after every run: a long run stopped halfway keeps what it measured.
        report = {"date": datetime.now().isoformat(timespec="seconds"), "model": args.source_model,
                  "hf_overrides": overrides, "load_format": args.load_format, "modes": modes,
                  "workload": workload(args, requests), "machine": machine(), "systems": results,
                  "ratios": ratios(results), "failed_systems": broken}
        if is_one_user(args):
            report["one_user"] = latency_ratios(results)
        Path(args.result_filename).write_text(json.dumps(report, indent=2, allow_nan=False))
    print(format_table(results))
    load = workload(args, requests)
    title = (f"{served_name(args)}, {load['num_prompts']} requests, prompts {load['prompt_len_range']}, "
             f"outputs {load['output_len_range']} tokens, {cores()} cores")
    if is_one_user(args):
        print(format_one_user(latency_ratios(results)))
        title = f"one user: {title}"
    if results:
        draw(results, title, args.chart, (latency_ratios(results) or None) if is_one_user(args) else None)
    print(f"wrote {args.result_filename}" + (f" and {args.chart}" if results else ""))
    failed = sum(s["failed"] for s in results.values())
    return 1 if failed or broken else 0
