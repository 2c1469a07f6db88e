"""`bench compare`'s llama.cpp peer and its one-user mode (`bench one-user`), without a server:
the flags as parsed, the command lines each system is started with, the checks that refuse a
run that cannot work, and the report (JSON, table, chart) built from fake timings."""
from __future__ import annotations

import json
import os

import pytest

from pagedserve.entrypoints.bench import compare
from pagedserve.entrypoints.bench.one_user import format_one_user, latency_ratios
from pagedserve.entrypoints.cli import build_parser



@pytest.fixture
def peers(tmp_path):
    """A stand-in llama-server and two GGUF files (the bench only checks that they exist)."""
    server = tmp_path / "llama-server"
    server.write_text("#!/bin/sh\n")
    files = {name: tmp_path / f"TinyModel-{name}.gguf" for name in ("f32", "q8_0")}
    for path in files.values():
        path.write_bytes(b"GGUF")
    return server, files


def parse(*argv: str):
    return build_parser().parse_args(["bench", *argv])


def test_one_user_defaults_are_one_request_at_a_time(bench_model_dir):
    args = parse("one-user", "--model", str(bench_model_dir))
    assert (args.max_concurrency, args.num_prompts, args.random_input_len, args.random_output_len,
            args.random_range_ratio) == (1, 5, 256, 128, 0.0)
    assert (args.systems, args.modes) == ("pagedserve,llamacpp", "streamed")
    assert args.result_filename == "one-user.json" and args.chart == "one-user.png"
    # Every request exactly 256 tokens in and 128 out.
    requests = compare.build_requests(args)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(256, 128)] * 5


def test_llamacpp_command_serves_the_gguf_with_a_slot_per_concurrent_request(bench_model_dir, peers):
    server, files = peers
    args = parse("compare", "--model", str(bench_model_dir), "--systems", "llamacpp", "--llamacpp-server", str(server),
                 "--llamacpp-gguf", str(files["q8_0"]), "--max-concurrency", "3", "--llamacpp-arg=--no-repack")
    args.source_model = args.model
    cmd, env = compare.server_command(args, "llamacpp", 8123)
    assert env == {}
    assert cmd[0] == str(server)
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["--model"] == str(files["q8_0"]) and flags["--alias"] == "TinyModel"
    assert flags["--port"] == "8123" and flags["-np"] == "3" and flags["-c"] == str(3 * 2048)
    assert flags["-t"] == flags["-tb"] == str(len(os.sched_getaffinity(0)))
    assert cmd[-1] == "--no-repack" and "--no-repack" in compare.settings(args, "llamacpp")
    # Without --max-concurrency every request is in flight at once: a slot each.
    args.max_concurrency = None
    assert dict(zip(*[iter(compare.server_command(args, "llamacpp", 1)[0][1:])] * 2))["-np"] == "64"


def test_gguf_is_served_by_both_pagedserve_and_llamacpp(bench_model_dir, peers):
    server, files = peers
    args = parse("one-user", "--model", str(bench_model_dir), "--llamacpp-server", str(server), "--gguf", str(files["q8_0"]))
    args.source_model = args.model
    cmd, _ = compare.server_command(args, "pagedserve", 8124)
    i = cmd.index("--model")
    assert cmd[i + 1] == str(files["q8_0"]) and cmd[cmd.index("--tokenizer") + 1] == str(bench_model_dir)
    assert cmd[cmd.index("--served-model-name") + 1] == "TinyModel"
    assert compare.llamacpp_gguf(args) == str(files["q8_0"])
    assert "TinyModel-q8_0.gguf" in compare.settings(args, "pagedserve")
    # Without --gguf pagedserve serves the directory, llama.cpp `make gguf`'s f32 file.
    plain = parse("one-user", "--model", str(bench_model_dir))
    plain.source_model = plain.model
    cmd, _ = compare.server_command(plain, "pagedserve", 8125)
    assert cmd[cmd.index("--model") + 1] == str(bench_model_dir) and "--tokenizer" not in cmd
    assert compare.llamacpp_gguf(plain) == os.path.join(".peers", "gguf", "TinyModel-f32.gguf")


@pytest.mark.parametrize("extra, message", [
    (["--llamacpp-server", "/nonexistent/llama-server"], "make peers"),
    (["--llamacpp-gguf", "/nonexistent/x.gguf"], "make gguf"),
    (["--load-format", "dummy"], "GGUF file's own weights"),
])
def test_llamacpp_runs_refused_with_the_fix(bench_model_dir, peers, extra, message):
    server, files = peers
    base = ["--llamacpp-server", str(server), "--llamacpp-gguf", str(files["f32"])]
    args = parse("one-user", "--model", str(bench_model_dir), *base, *extra)
    with pytest.raises(SystemExit, match=message):
        compare.check_systems(args)


def test_a_missing_gguf_for_pagedserve_is_refused(bench_model_dir):
    args = parse("compare", "--model", str(bench_model_dir), "--systems", "pagedserve", "--gguf", "/nonexistent/m.gguf")
    with pytest.raises(SystemExit, match="is not a file"):
        compare.check_systems(args)


def fake_row(system: str, tpot: float, ttft: float, mode: str = "streamed") -> dict:
    return {"system": system, "mode": mode, "median_tpot_ms": tpot, "median_ttft_ms": ttft}


def test_latency_ratios_are_pagedserve_over_each_system():
    rows = {"pagedserve": fake_row("pagedserve", 20.0, 200.0), "llamacpp": fake_row("llamacpp", 10.0, 400.0),
            "vllm (plain)": fake_row("vllm", None, None, "plain")}
    found = latency_ratios(rows)
    assert set(found) == {"pagedserve", "llamacpp"}  # plain requests measure no TPOT
    assert found["llamacpp"] == {"median_tpot_ms": 10.0, "median_ttft_ms": 400.0, "tpot_ratio": 2.0, "ttft_ratio": 0.5}
    assert found["pagedserve"]["tpot_ratio"] == found["pagedserve"]["ttft_ratio"] == 1.0
    table = format_one_user(found)
    assert "2.00x" in table and "0.50x" in table
    # No pagedserve row: the medians, but no ratios.
    alone = latency_ratios({"llamacpp": rows["llamacpp"]})
    assert alone["llamacpp"]["tpot_ratio"] is None and "-" in format_one_user(alone)


def test_one_user_report_from_fake_timings(bench_model_dir, peers, tmp_path, monkeypatch):
    """compare() end to end with each system's run replaced by fixed timings: the JSON holds the
    one-user section with the ratios, the chart is a PNG, and the table is printed."""
    server, files = peers
    timings = {"pagedserve": (24.0, 212.0), "llamacpp": (12.0, 424.0)}

    def fake_run(args, system, requests, mode):
        tpot, ttft = timings[system]
        return {**fake_row(system, tpot, ttft, mode), "output_throughput": 1000 / tpot, "request_throughput": 0.1,
                "p99_tpot_ms": tpot, "output_tokens_per_cpu_second": 10.0, "failed": 0,
                "cpu_seconds_per_1k_output_tokens": {system: 1.0}}

    monkeypatch.setattr(compare, "run_system", fake_run)
    result, chart = tmp_path / "one-user.json", tmp_path / "one-user.png"
    args = parse("one-user", "--model", str(bench_model_dir), "--llamacpp-server", str(server), "--gguf", str(files["q8_0"]),
                 "--num-prompts", "2", "--result-filename", str(result), "--chart", str(chart))
    assert compare.main(args) == 0
    report = json.loads(result.read_text())
    assert report["workload"]["max_concurrency"] == 1 and report["workload"]["num_prompts"] == 2
    assert report["one_user"]["llamacpp"]["tpot_ratio"] == 2.0 and report["one_user"]["llamacpp"]["ttft_ratio"] == 0.5
    assert report["ratios"] == {"pagedserve/llamacpp": 0.5}  # throughput: pagedserve's over llama.cpp's
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Many users (no --max-concurrency 1): no one-user section.
    many = parse("compare", "--model", str(bench_model_dir), "--systems", "pagedserve,llamacpp", "--modes", "streamed",
                 "--llamacpp-server", str(server), "--llamacpp-gguf", str(files["f32"]), "--num-prompts", "2",
                 "--result-filename", str(result), "--chart", str(chart))
    assert compare.main(many) == 0
    assert "one_user" not in json.loads(result.read_text())
