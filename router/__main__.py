"""python -m pagedserve.router --model DIR --scheduler-addr 127.0.0.1:50051 [--port 8000] ..."""
from __future__ import annotations

import argparse
import signal

import uvicorn

from pagedserve.flags import add_arguments, from_namespace
from pagedserve.parent_watch import stop_with_parent
from pagedserve.router import discovery
from pagedserve.router.app import build_app
from pagedserve.router.logs import configure_logging
from pagedserve.router.settings import RouterArgs, Settings


def parse_args(argv: list[str] | None = None) -> RouterArgs:
    p = argparse.ArgumentParser(prog="python -m pagedserve.router",
                                description="pagedserve's OpenAI-compatible HTTP router.")
    add_arguments(p, RouterArgs)
    return from_namespace(RouterArgs, p.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")
    try:
        discovery.split_targets(args.scheduler_addrs or args.scheduler_addr)
    except ValueError as err:
        raise SystemExit(f"--scheduler-addrs: {err}") from None
    configure_logging(args.log_level)
    settings = from_namespace(Settings, args)
    # On SIGTERM uvicorn closes its socket, lets the requests in flight finish, then raises the
    # signal again under the handler it found: this one, so a drained router exits with 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    stop_with_parent()
    uvicorn.run(build_app(settings), host=args.host, port=args.port,
                log_level=args.log_level.lower(), log_config=None,
                timeout_graceful_shutdown=args.shutdown_timeout)


if __name__ == "__main__":
    main()
