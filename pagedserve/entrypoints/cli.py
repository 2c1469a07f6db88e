"""The `pagedserve` command: serve, run-batch, bench."""
from __future__ import annotations

import argparse
import sys

from pagedserve.flags import HelpFormatter

from .serve_args import add_serve_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API and gRPC",
                           formatter_class=HelpFormatter)
    add_serve_args(serve)
    from .run_batch import add_run_batch_args
    add_run_batch_args(sub.add_parser("run-batch", help="run a file of requests in OpenAI's "
                                      "batch format, results to a file",
                                      formatter_class=HelpFormatter))
    from .bench.cli import add_bench_parser
    add_bench_parser(sub)
    return parser


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of `pagedserve NAME`."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench.cli import run as run_bench
        sys.exit(run_bench(args))
    if args.command == "serve":
        from .launcher import Launcher
        from .serve_args import check_serve_args
        refused = check_serve_args(args)
        if refused:
            subcommand(parser, "serve").error(refused)
        sys.exit(Launcher(args).run())
    if args.command == "run-batch":
        from .run_batch import refuse_flags_base_url_ignores, run_batch
        # The top-level parser has no options of its own: the command is the first word.
        refuse_flags_base_url_ignores(subcommand(parser, "run-batch"),
                                      argv[argv.index("run-batch") + 1:], args)
        sys.exit(run_batch(args))


if __name__ == "__main__":
    main()
