"""The `pagedserve` command: serve, run-batch, bench."""
from __future__ import annotations

import argparse
import sys

from router.tool_parsers import PARSERS as TOOL_PARSERS


def add_serve_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="a Hugging Face model directory")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API")
    p.add_argument("--grpc-port", type=int, default=50051, help="the scheduler's public gRPC port")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    kv.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-waiting-requests", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (needs --tool-call-parser)')
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help='how tool calls are found in the text of tool_choice "auto" replies')
    p.add_argument("--num-threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds each process gives requests in flight to finish after SIGTERM")
    p.add_argument("--max-request-body-bytes", type=int, default=None,
                   help="the router answers 413 to larger bodies (default: 16 MiB)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API and gRPC")
    add_serve_args(serve)
    from .batch import add_run_batch_args, run_batch
    add_run_batch_args(sub.add_parser("run-batch", help="run a file of requests in OpenAI's "
                                      "batch format, results to a file"))
    from .bench.cli import add_bench_parser, run as run_bench
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        sys.exit(run_bench(args))
    if args.command == "serve":
        from .launcher import Launcher
        sys.exit(Launcher(args).run())
    if args.command == "run-batch":
        sys.exit(run_batch(args))


if __name__ == "__main__":
    main()
