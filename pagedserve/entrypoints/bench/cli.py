"""The flags of `pagedserve bench serve|compare|compare-hf|host|one-user|kernels` (vLLM's names for the
workload), each subcommand's code imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import json
import math

from pagedserve.flags import HelpFormatter

from .model_dir import NOOP_OVERRIDES

DEFAULT_SYSTEMS = "pagedserve,vllm,transformers"
HF_SYSTEMS = "transformers-sequential,transformers,pagedserve"
# `bench host`: the serving stack's own cost, with a model whose forward pass costs almost nothing
# (issue 22): 256 requests of 64 random tokens, 256 out, all at once.
HOST_DEFAULTS = {"model": "models/SmolLM2-135M-Instruct", "systems": None, "hf_overrides": json.dumps(NOOP_OVERRIDES), "load_format": "dummy",
                 "modes": "streamed", "served_model_name": "noop", "num_prompts": 256, "random_input_len": 64,
                 "random_output_len": 256, "random_range_ratio": 0.0, "max_num_seqs": 256}

# `bench one-user` (issue 33): one request at a time, a 256-token prompt and 128 tokens out,
# streamed, 5 times; pagedserve against llama.cpp's llama-server.
ONE_USER_DEFAULTS = {"systems": "pagedserve,llamacpp", "modes": "streamed", "num_prompts": 5, "random_input_len": 256,
                     "random_output_len": 128, "random_range_ratio": 0.0, "max_concurrency": 1}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-name", choices=["random", "jsonl"], default="random")
    p.add_argument("--dataset-path", default=None, help="with --dataset-name jsonl: lines of "
                   '{"prompt": text or token ids, "output_len": N}')
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=272)
    p.add_argument("--random-output-len", type=int, default=136,
                   help="also the output length of jsonl lines that give none")
    p.add_argument("--random-range-ratio", type=float, default=0.8824,
                   help="lengths uniform in [len*(1-r), len*(1+r)]; 0: every prompt and output exactly "
                        "its length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once; unset: every request")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: all at once")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--disable-tqdm", action="store_true")


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="benchmark a running OpenAI-compatible server",
                       formatter_class=HelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root (or its /v1)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", required=True, help="the served model name (a model directory also "
                   "gives random prompts its vocabulary)")
    p.add_argument("--served-model-name", default=None, help="the name to send, when --model is a directory")
    p.add_argument("--tokenizer", default=None, help="a model directory for the vocabulary of random prompts")
    p.add_argument("--api-key", default=None)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-stream: plain requests, measured end to end only (no TTFT, TPOT, ITL)")
    add_workload_args(p)
    p.add_argument("--save-result", action="store_true", help="write the result as JSON")
    p.add_argument("--result-filename", default=None)
    p.set_defaults(bench_main="pagedserve.entrypoints.bench.serve:main")


def add_compare(sub, name: str, help: str, **defaults) -> None:
    """A comparison subcommand; `defaults` replace the flags' own (a workload, systems, modes)."""
    p = sub.add_parser(name, help=help, formatter_class=HelpFormatter)
    p.add_argument("--model", required="model" not in defaults,
                   help="a Hugging Face model directory, served by every system")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help="comma-separated, in run order: pagedserve, vllm (both cores), vllm-default, "
                        "transformers (static batches of --hf-batch-size), transformers-sequential, "
                        "llamacpp (llama.cpp's llama-server on a GGUF file, -np = the concurrency)")
    p.add_argument("--modes", default="streamed,plain",
                   help="comma-separated: streamed, plain (stream: false); a server runs the workload once "
                        "per mode, each time freshly started")
    p.add_argument("--hf-overrides", default=None, metavar="JSON",
                   help='vLLM\'s flag: config.json fields to change, e.g. \'{"num_hidden_layers": 1}\'; '
                        "the servers get a directory of --model's config and tokenizer in that shape (no weights: "
                        "use --load-format dummy)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights, for every server (not transformers)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--vllm-python", default=".peers/vllm/bin/python", help="the venv `make peers` creates")
    p.add_argument("--llamacpp-server", default=".peers/llama.cpp/bin/llama-server",
                   help="the llama-server `make peers` builds")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="a GGUF file pagedserve serves (--model FILE --tokenizer, the --model directory) and "
                        "llama.cpp too, so that both run the same weights")
    p.add_argument("--llamacpp-arg", action="append", default=[], metavar="FLAG",
                   help="an extra flag for llama-server (repeat for more), e.g. --llamacpp-arg=--no-repack")
    p.add_argument("--llamacpp-gguf", default=None, metavar="FILE",
                   help="llama.cpp's GGUF file when it differs from --gguf; default: --gguf, else the f32 file "
                        "`make gguf` writes (.peers/gguf/<model>-f32.gguf)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM's flag, given to every server (pagedserve, vllm): most sequences in a step. Unset, "
                        "each keeps its own default, which differ: vLLM's CPU build serves 128, pagedserve 256")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's flag, given to every server: most tokens computed in a step (both default to 2048 on CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the dtype pagedserve and vLLM both serve in (their --dtype); llama.cpp runs its GGUF "
                        "file's and transformers float32")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="an extra flag for `pagedserve serve` (repeat for more)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--log-dir", default="bench-logs", help="where each server's output goes")
    add_workload_args(p)
    p.add_argument("--result-filename", default=f"{name}.json")
    p.add_argument("--chart", default=f"{name}.png", help="PNG chart of the results")
    p.set_defaults(bench_main="pagedserve.entrypoints.bench.compare:main", **defaults)


def add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="paged attention (decode, prefill) against SDPA",
                       formatter_class=HelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--context-lens", default="128,512,2048")
    p.add_argument("--prompt-lens", default="64,290,512,1024,2048", help="prefill: fresh prompts of these lengths")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="prefill: tokens per step (prompts of a length)")
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-filename", default="kernels.json")
    p.set_defaults(bench_main="pagedserve.entrypoints.bench.kernels:main")


def add_bench_parser(sub) -> None:
    """`pagedserve bench ...`, on the top-level subparsers of `pagedserve`."""
    bench = sub.add_parser("bench", help="benchmarks: serve, compare, compare-hf, host, kernels",
                           formatter_class=HelpFormatter)
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    add_serve(kinds)
    add_compare(kinds, "compare", "start each system in turn on one model and run one workload through each")
    add_compare(kinds, "compare-hf", "transformers one request at a time, in static batches, and pagedserve, "
                "on one workload", systems=HF_SYSTEMS, modes="streamed")
    add_compare(kinds, "host", "the serving stack's own cost: pagedserve (and vLLM, where `make peers` installed "
                "it) serving a one-layer model of --model's tokenizer with dummy weights (--hf-overrides), "
                "256 requests of 64 tokens in, 256 out; CPU seconds per process", **HOST_DEFAULTS)
    add_compare(kinds, "one-user", "one user: one request at a time (256-token prompt, 128 out, streamed, "
                "--num-prompts times), pagedserve and llama.cpp; median TPOT and TTFT and their ratios to "
                "pagedserve's", **ONE_USER_DEFAULTS)
    add_kernels(kinds)


def run(args) -> int:
    module, function = args.bench_main.split(":")
    return getattr(importlib.import_module(module), function)(args)
