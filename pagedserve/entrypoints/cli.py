"""The `pagedserve` command: serve, run-batch, bench."""
from __future__ import annotations

import argparse
import sys

from .serve_args import add_serve_args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API and gRPC")
    add_serve_args(serve)
    from .run_batch import add_run_batch_args, run_batch
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
