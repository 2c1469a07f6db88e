"""The benchmarks at a tiny size, through their real command lines: `pagedserve bench serve`
(streamed and plain) against the shared SmolLM2 stack, `bench compare-hf` and `bench compare`
(transformers both ways and a pagedserve of their own, no vLLM), `bench host` (a pagedserve of its
own on the no-op model), `bench kernels`, and benchmarks/profile_step.py on a tiny random Llama and
on a shape given by --hf-overrides. Each result must hold every field with plausible values."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from pagedserve.entrypoints.bench.client import RequestOutput
from pagedserve.entrypoints.bench.compare import ratios, server_command
from pagedserve.entrypoints.bench.datasets import length_range, random_requests, vocab_size_of
from pagedserve.entrypoints.bench.metrics import LATENCIES, summarize
from pagedserve.entrypoints.bench.model_dir import NOOP_OVERRIDES, build_model_dir
from tests.conftest import REPO_ROOT

LATENCY_KEYS = [f"{stat}_{name}_ms" for name in LATENCIES for stat in ("mean", "median", "std", "p99")]
# One torch thread: on a machine shared by several test runs, two OpenMP threads spend most of
# their time waiting for each other at barriers.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_WORKLOAD = ["--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "6",
                 "--random-range-ratio", "0.5", "--seed", "3", "--disable-tqdm"]


def pagedserve(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or ONE_THREAD)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def benchmark_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs benchmarks/NAME with ARGS from the repository root; fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def expected_output_tokens(model_dir) -> int:
    """ignore_eos: every request generates exactly its output length."""
    return sum(r.output_len for r in random_requests(4, 16, 6, 0.5, vocab_size_of(str(model_dir)), seed=3))


def check_serving_metrics(result: dict, completed: int, output_tokens: int) -> None:
    assert result["completed"] == completed and result["failed"] == 0
    assert result["total_output_tokens"] == output_tokens
    assert result["duration"] > 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert result[key] > 0, key
    assert result["total_token_throughput"] > result["output_throughput"]
    for name in LATENCIES:
        mean, median, p99 = (result[f"{s}_{name}_ms"] for s in ("mean", "median", "p99"))
        assert 0 < median <= p99 and 0 < mean <= p99, name
        assert result[f"std_{name}_ms"] >= 0
    # A request's time to its first token is part of its end-to-end latency.
    assert result["median_ttft_ms"] < result["p99_e2el_ms"]


def test_summarize_follows_vllm_definitions():
    outputs = [RequestOutput(True, 10, 5, ttft=0.1, itl=[0.02, 0.02, 0.03, 0.03], latency=0.2),
               RequestOutput(True, 20, 3, ttft=0.3, itl=[0.05, 0.05], latency=0.4),
               RequestOutput(False, 7, 0, error="HTTP 500")]
    result = summarize(outputs, duration=2.0, percentiles=(50, 99))
    assert (result["completed"], result["failed"]) == (2, 1)
    assert result["output_throughput"] == pytest.approx(8 / 2.0)
    assert result["total_token_throughput"] == pytest.approx(38 / 2.0)
    # TPOT leaves the first token out: (0.2 - 0.1) / 4 and (0.4 - 0.3) / 2.
    assert result["mean_tpot_ms"] == pytest.approx((25 + 50) / 2)
    assert result["median_itl_ms"] == pytest.approx(30)
    assert result["p50_ttft_ms"] == pytest.approx(200) and result["p99_ttft_ms"] == pytest.approx(298)
    assert result["errors"] == ["", "", "HTTP 500"]


def test_plain_requests_have_latency_but_no_ttft_or_tpot():
    outputs = [RequestOutput(True, 10, 4, latency=0.2, streamed=False),
               RequestOutput(True, 10, 6, latency=0.4, streamed=False)]
    result = summarize(outputs, duration=0.5)
    assert result["output_throughput"] == pytest.approx(20)
    assert result["median_e2el_ms"] == pytest.approx(300)
    for name in ("ttft", "tpot", "itl"):
        assert result[f"median_{name}_ms"] is None and result[f"p99_{name}_ms"] is None, name
    assert result["ttfts"] == [None, None]


def test_ratios_compare_each_mode_with_pagedserve_in_that_mode():
    def row(system, mode, tok_s):
        return {"system": system, "mode": mode, "output_throughput": tok_s}
    rows = {"pagedserve": row("pagedserve", "streamed", 300.0), "pagedserve (plain)": row("pagedserve", "plain", 200.0),
            "vllm": row("vllm", "streamed", 150.0), "vllm (plain)": row("vllm", "plain", 400.0),
            "transformers": row("transformers", "generate", 100.0)}
    assert ratios(rows) == {"pagedserve/vllm": 2.0, "pagedserve (plain)/vllm (plain)": 0.5,
                            "pagedserve/transformers": 3.0}


def test_model_dir_of_another_shape_keeps_the_tokenizer_and_no_weights(model_dir, tmp_path):
    built = build_model_dir(model_dir, tmp_path / "noop", NOOP_OVERRIDES | {"vocab_size": 150000})
    config = json.loads((built / "config.json").read_text())
    source = json.loads((model_dir / "config.json").read_text())
    assert config == source | NOOP_OVERRIDES | {"vocab_size": 150000}
    assert (built / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert not list(built.glob("*.safetensors")) and list(model_dir.glob("*.safetensors"))


def test_random_workload_lengths_follow_the_range_ratio():
    # The defaults of `bench compare`: prompts of 32-512 tokens, outputs of 16-256.
    assert length_range(272, 0.8824) == (32, 512) and length_range(136, 0.8824) == (16, 256)
    requests = random_requests(200, 272, 136, 0.8824, vocab_size=49152, seed=0)
    assert all(32 <= r.prompt_len <= 512 and len(r.prompt) == r.prompt_len for r in requests)
    assert all(16 <= r.output_len <= 256 for r in requests)
    assert all(1000 <= t < 49152 for r in requests for t in r.prompt)
    assert requests == random_requests(200, 272, 136, 0.8824, vocab_size=49152, seed=0)


def test_bench_serve_reports_vllm_result_keys(smol_stack, model_dir, tmp_path):
    path = tmp_path / "serve.json"
    proc = pagedserve("bench", "serve", "--base-url", smol_stack.root_url, "--model", "SmolLM2-135M-Instruct",
                      "--tokenizer", str(model_dir), "--max-concurrency", "2", *TINY_WORKLOAD,
                      "--metric-percentiles", "50,99", "--save-result", "--result-filename", str(path))
    assert "Serving Benchmark Result" in proc.stdout and "Output token throughput" in proc.stdout
    result = json.loads(path.read_text())
    check_serving_metrics(result, 4, expected_output_tokens(model_dir))
    assert result["max_concurrency"] == 2 and result["num_prompts"] == 4
    assert result["p50_ttft_ms"] == pytest.approx(result["median_ttft_ms"])
    assert len(result["ttfts"]) == len(result["itls"]) == 4 and result["errors"] == [""] * 4
    assert result["input_lens"] == [r.prompt_len for r in random_requests(4, 16, 6, 0.5, 49152, seed=3)]


def test_bench_serve_plain_requests(smol_stack, model_dir, tmp_path):
    path = tmp_path / "plain.json"
    proc = pagedserve("bench", "serve", "--base-url", smol_stack.root_url, "--model", "SmolLM2-135M-Instruct",
                      "--tokenizer", str(model_dir), "--no-stream", *TINY_WORKLOAD,
                      "--save-result", "--result-filename", str(path))
    result = json.loads(path.read_text())
    assert result["stream"] is False and result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == expected_output_tokens(model_dir)
    assert 0 < result["median_e2el_ms"] <= result["p99_e2el_ms"] and result["output_throughput"] > 0
    assert result["median_ttft_ms"] is None and result["median_tpot_ms"] is None
    assert "Median TPOT (ms):" in proc.stdout


def test_host_bench_runs_the_noop_model_streamed_and_plain(model_dir, tmp_path):
    """`bench host` builds the no-op model from the SmolLM2 directory and serves it with dummy
    weights, once per mode; each process's CPU seconds per 1,000 output tokens come back."""
    result_path = tmp_path / "host.json"
    proc = pagedserve("bench", "host", "--model", str(model_dir), "--systems", "pagedserve",
                      "--modes", "streamed,plain", "--num-prompts", "4", "--random-input-len", "8",
                      "--random-output-len", "32", "--disable-tqdm", "--server-arg=--num-threads=1",
                      "--result-filename", str(result_path), "--chart", str(tmp_path / "host.png"),
                      "--log-dir", str(tmp_path / "logs"),
                      env={k: v for k, v in ONE_THREAD.items() if k != "OMP_WAIT_POLICY"})  # the worker's default
    report = json.loads(result_path.read_text())
    assert report["hf_overrides"] == NOOP_OVERRIDES and report["load_format"] == "dummy"
    assert report["workload"]["prompt_len_range"] == [8, 8] and report["workload"]["output_tokens"] == 4 * 32
    # Strict JSON (no Infinity), and the batch limit every server got.
    assert report["workload"]["request_rate"] == "inf" and report["workload"]["max_num_seqs"] == 256
    json.loads(result_path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    rows = report["systems"]
    assert list(rows) == ["pagedserve", "pagedserve (plain)"] and report["failed_systems"] == {}
    for name, row in rows.items():
        assert row["completed"] == 4 and row["total_output_tokens"] == 4 * 32, name
        per_1k = row["cpu_seconds_per_1k_output_tokens"]
        for process in ("router", "scheduler", "worker"):
            assert per_1k[process] > 0, (name, process)
            assert per_1k[process] == pytest.approx(row["cpu_seconds"][process] * 1000 / (4 * 32), abs=1e-4)
        assert "--load-format dummy --max-num-seqs 256" in row["settings"] and name in proc.stdout
    assert rows["pagedserve"]["median_tpot_ms"] > 0 and rows["pagedserve (plain)"]["median_tpot_ms"] is None
    assert "CPU seconds per 1,000 output tokens" in proc.stdout
    # The worker loaded the built directory, not SmolLM2's.
    log = (tmp_path / "logs" / "pagedserve-streamed.log").read_text()
    assert "LlamaForCausalLM loaded from " in log and f"{model_dir.name}-hf-overrides:" in log
    # The worker's default OpenMP wait (worker/__main__.py), named in its start-up line.
    assert "1 threads (OpenMP wait policy spin 10000 times, then sleep)" in log


def test_batch_limits_go_to_every_server_alike():
    """vLLM's CPU build serves 128 sequences a step by default and pagedserve 256: a comparison
    gives both the same limits, by vLLM's flag names."""
    args = argparse.Namespace(model="m", served_model_name="m", load_format="dummy", server_arg=["--x"],
                              vllm_python="py", max_num_seqs=128, max_num_batched_tokens=1024)
    for system in ("pagedserve", "vllm"):
        cmd = server_command(args, system, 8000)[0]
        flags = cmd[cmd.index("--max-num-seqs"):cmd.index("--max-num-seqs") + 4]
        assert flags == ["--max-num-seqs", "128", "--max-num-batched-tokens", "1024"], (system, cmd)
    args.max_num_seqs = args.max_num_batched_tokens = None  # unset: each server's own default
    assert not {"--max-num-seqs", "--max-num-batched-tokens"} & set(server_command(args, "vllm", 8000)[0])


def test_compare_hf_runs_transformers_both_ways_and_pagedserve(model_dir, tmp_path):
    result_path, chart = tmp_path / "compare-hf.json", tmp_path / "compare-hf.png"
    proc = pagedserve("bench", "compare-hf", "--model", str(model_dir), "--hf-batch-size", "3", *TINY_WORKLOAD,
                      "--server-arg=--num-threads=1",
                      "--result-filename", str(result_path), "--chart", str(chart),
                      "--log-dir", str(tmp_path / "logs"))
    report = json.loads(result_path.read_text())
    systems = report["systems"]
    assert list(systems) == ["transformers-sequential", "transformers", "pagedserve"]
    tokens = expected_output_tokens(model_dir)
    for name, result in systems.items():
        check_serving_metrics(result, 4, tokens)
        assert name in proc.stdout
        assert result["output_tokens_per_cpu_second"] > 0
    # The CPU each process of the stack used during the run (the worker does the work).
    used = systems["pagedserve"]["cpu_seconds"]
    assert {"worker", "scheduler", "router", "bench client"} <= set(used)
    assert used["worker"] > max(used["scheduler"], used["router"])
    assert set(report["ratios"]) == {"pagedserve/transformers-sequential", "pagedserve/transformers"}
    assert report["ratios"]["pagedserve/transformers"] == pytest.approx(
        systems["pagedserve"]["output_throughput"] / systems["transformers"]["output_throughput"])
    assert report["workload"]["output_tokens"] == tokens and report["machine"]["cores"] >= 1
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_peers_says_how_to_get_them(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "bench", "compare", "--model", str(model_dir),
                           "--systems", "pagedserve,vllm", "--vllm-python", str(tmp_path / "no-venv" / "python")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "make peers" in proc.stderr


def test_compare_runs_transformers_alone(model_dir, tmp_path):
    result_path = tmp_path / "compare.json"
    pagedserve("bench", "compare", "--model", str(model_dir), "--systems", "transformers", "--hf-batch-size", "4",
               *TINY_WORKLOAD, "--result-filename", str(result_path), "--chart", str(tmp_path / "c.png"))
    report = json.loads(result_path.read_text())
    check_serving_metrics(report["systems"]["transformers"], 4, expected_output_tokens(model_dir))
    assert report["ratios"] == {} and report["failed_systems"] == {}  # no pagedserve, no ratio


def test_kernel_benchmark_rows(tmp_path):
    path = tmp_path / "kernels.json"
    pagedserve("bench", "kernels", "--batch-sizes", "1,3", "--context-lens", "5,40", "--iters", "2",
               "--prompt-lens", "7,30", "--prefill-tokens", "40", "--result-filename", str(path))
    report = json.loads(path.read_text())
    assert report["copy_bandwidth_bytes_per_s"] > 0
    kernels = {row["kernel"] for row in report["rows"]}
    assert kernels == {"sdpa_contiguous", "cpu_decode_kernel", "torch_gather_sdpa"}
    assert len(report["rows"]) == 3 * 4
    for row in report["rows"]:
        assert row["ms"] >= row["min_ms"] > 0 and row["bytes_per_s"] > 0
        assert row["kv_bytes"] == 2 * row["batch"] * row["context"] * 3 * 64 * 4
    prefill = [(row["kernel"], row["num_seqs"], row["prompt_len"]) for row in report["prefill_rows"]]
    assert prefill == [("worker", 5, 7), ("sdpa_per_sequence", 5, 7), ("worker", 1, 30), ("sdpa_per_sequence", 1, 30)]
    assert all(row["ms"] >= row["min_ms"] > 0 and row["gflops"] > 0 for row in report["prefill_rows"])


def make_tiny_llama(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)


def test_profile_step_splits_a_decode_step(tmp_path):
    make_tiny_llama(tmp_path / "tiny")
    path = tmp_path / "profile.json"
    proc = benchmark_script("profile_step.py", "--model", str(tmp_path / "tiny"), "--batch", "4", "--prompt-len", "20",
                            "--steps", "3", "--warmup", "1", "--num-threads", "1", "--json", str(path), timeout=300)
    report = json.loads(path.read_text())
    parts = report["parts_ms"]
    assert report["batch"] == 4 and report["plan_bytes"] > 0 and report["result_bytes"] > 0
    for name in ("forward pass (matmuls, norms, rotary, MLP)", "attention", "LM head", "sampling",
                 "scheduler: plan building", "protobuf serialization"):
        assert parts[name] > 0, name
    # The parts are disjoint and make up the step.
    total = parts.pop("step total")
    assert sum(parts.values()) == pytest.approx(total, rel=1e-6)
    assert "outside the forward pass" in proc.stdout


def test_profile_step_takes_any_shape_with_dummy_weights(model_dir, tmp_path):
    path = tmp_path / "profile.json"
    overrides = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "head_dim": 32, "intermediate_size": 128}
    benchmark_script("profile_step.py", "--model", str(model_dir), "--load-format", "dummy",
                     "--hf-overrides", json.dumps(overrides), "--vocab-size", "3000", "--batch", "3",
                     "--prompt-len", "10", "--steps", "2", "--warmup", "1", "--num-threads", "1",
                     "--json", str(path), timeout=300)
    report = json.loads(path.read_text())
    assert (report["num_layers"], report["hidden_size"], report["vocab_size"]) == (1, 64, 3000)
    assert report["hf_overrides"] == overrides | {"vocab_size": 3000}
    assert report["batch"] == 3 and report["parts_ms"]["LM head"] > 0 and report["parts_ms"]["sampling"] > 0


def test_profile_step_with_async_scheduling_times_the_overlapped_step(tmp_path):
    make_tiny_llama(tmp_path / "tiny")
    path = tmp_path / "profile.json"
    proc = benchmark_script("profile_step.py", "--model", str(tmp_path / "tiny"), "--batch", "4", "--prompt-len", "20",
                            "--steps", "3", "--warmup", "1", "--num-threads", "1", "--async-scheduling",
                            "--json", str(path), timeout=300)
    report = json.loads(path.read_text())
    parts = report["parts_ms"]
    assert report["batch"] == 4
    for name in ("step (wall, overlapped)", "worker: whole step", "scheduler: plan building",
                 "scheduler: result handling"):
        assert parts[name] > 0, name
    assert "with async scheduling" in proc.stdout


def test_layer_ops_benchmark_rows(tmp_path):
    path = tmp_path / "layer_ops.json"
    proc = benchmark_script("layer_ops.py", "--tokens", "8", "--iters", "2", "--num-threads", "1", "--output", str(path))
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["residual add + RMSNorm", "rotary (q and k)", "KV cache write", "SiLU * up",
                                       "per forward pass (30 layers)"]
    assert all(r["tokens"] == 8 and r["torch_ms"] > 0 and r["compiled_ms"] > 0 for r in rows)
    assert "per forward pass" in proc.stdout


def test_linear_benchmark_rows(tmp_path):
    path = tmp_path / "linear.json"
    benchmark_script("linear.py", "--rows", "3", "20", "--rounds", "1", "--layers", "1", "--num-threads", "1",
                     "--output", str(path))
    rows = json.loads(path.read_text())["rows"]
    assert [r["rows"] for r in rows] == [3, 20]
    for way in ("mkl", "onednn_packed", "onednn", "cpu_linear"):
        assert all(r[f"{way}_ms"] > 0 and r[f"{way}_gflops"] > 0 for r in rows)


def test_fma_peak_benchmark_rows(tmp_path):
    """Its rows, by name, each a positive GFLOP/s. How they compare (matmuls below the ceiling,
    two threads above one) is what the benchmark measures and prints: on a machine shared with
    other work it varies from run to run, so it is no test."""
    path = tmp_path / "fma_peak.json"
    proc = benchmark_script("fma_peak.py", "--iters", "2000000", "--size", "256", "--rounds", "3",
                            "--output", str(path))
    result = json.loads(path.read_text())
    gflops, threads = result["gflops"], result["threads"]
    assert threads >= 1
    assert list(gflops)[:3] == ["FMA ceiling, 1 thread", f"FMA ceiling, {threads} threads",
                                "torch matmul 256x256x256"]
    assert all(value > 0 for value in gflops.values())
    for name in gflops:
        assert name in proc.stdout


def test_moe_profile_rows(tmp_path):
    """benchmarks/profile_moe.py at a tiny shape: a layer row and a step row per batch, the weights
    the grouped path reads being the active experts' once (never more than every expert's)."""
    path = tmp_path / "moe.json"
    benchmark_script("profile_moe.py", "--hidden", "64", "--inter", "32", "--experts", "8", "--top-k", "2",
                     "--layers", "1", "--vocab", "256", "--batches", "1", "16", "--rounds", "1", "--steps", "1",
                     "--threads", "1", "--output", str(path))
    result = json.loads(path.read_text())
    expert_mib = 3 * 64 * 32 * 4 / 2**20
    for row, batch in zip(result["layer"], [1, 16]):
        assert row["batch"] == batch and 2 <= row["active_experts"] <= min(8, 2 * batch)
        assert row["grouped_weight_mib"] == round(row["active_experts"] * expert_mib, 2)
        assert row["per_pair_weight_mib"] == round(2 * batch * expert_mib, 2)
        assert all(row[f"{way}_ms"] > 0 for way in ("router", "grouped", "transformers", "per_pair"))
    assert [r["batch"] for r in result["step"]] == [1, 16]
    assert all(0 < r["moe_ms"] < r["step_ms"] and 0 < r["moe_share"] < 1 for r in result["step"])


def test_one_user_gap_splits_a_served_token(tmp_path):
    from tests.helpers.tiny_models import build
    build("llama", tmp_path / "tiny")
    path = tmp_path / "gap.json"
    benchmark_script("one_user_gap.py", "--model", str(tmp_path / "tiny"), "--requests", "1", "--prompt-len", "8",
                     "--max-tokens", "5", "--env", "OMP_NUM_THREADS=1", "--json", str(path), timeout=300)
    report = json.loads(path.read_text())
    # Each decode step's round trip holds the worker's step, so their medians keep that order.
    assert report["scheduler_round_trip_ms"] >= report["worker_step_ms"] > 0
    assert report["client_itl_ms"] > 0 and report["env"] == {"OMP_NUM_THREADS": "1"}
