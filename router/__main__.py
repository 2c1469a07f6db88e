"""python -m router --model DIR --scheduler-addr 127.0.0.1:50051 [--port 8000] ..."""
from __future__ import annotations

import argparse
import os
import signal

import uvicorn

from pagedserve.parent_watch import stop_with_parent
from router.app import build_app
from router.logs import configure_logging
from router.settings import Settings
from router.tool_parsers import PARSERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m router",
                                description="pagedserve's OpenAI-compatible HTTP router.")
    p.add_argument("--model", help="model directory (its tokenizer and chat template); "
                   "default: the model_path the scheduler reports")
    p.add_argument("--scheduler-addr", default="127.0.0.1:50051",
                   help="the scheduler's gRPC address")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients pass as `model`; default: the "
                   "scheduler's, else the model directory's name")
    p.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* and /tokenize; also sent "
                   "to the scheduler, which takes the same flag")
    p.add_argument("--chat-template", help="a Jinja chat template file replacing the tokenizer's")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (needs --tool-call-parser)')
    p.add_argument("--tool-call-parser", choices=sorted(PARSERS),
                   help='how tool calls are found in the text of tool_choice "auto" replies')
    p.add_argument("--max-model-len", type=int,
                   help="lower the context length the scheduler allows")
    p.add_argument("--max-request-body-bytes", type=int, default=Settings.max_request_body_bytes,
                   help="answer 413 to larger request bodies (0: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds that requests in flight get to finish after SIGTERM")
    p.add_argument("--log-level", default=os.environ.get("PAGEDSERVE_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    settings = Settings(scheduler_addr=args.scheduler_addr, model=args.model,
                        served_model_name=args.served_model_name, api_key=args.api_key,
                        chat_template=args.chat_template, max_model_len=args.max_model_len,
                        max_request_body_bytes=args.max_request_body_bytes,
                        enable_auto_tool_choice=args.enable_auto_tool_choice,
                        tool_call_parser=args.tool_call_parser)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")
    # On SIGTERM uvicorn closes its socket, lets the requests in flight finish, then raises the
    # signal again under the handler it found: this one, so a drained router exits with 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    stop_with_parent()
    uvicorn.run(build_app(settings), host=args.host, port=args.port,
                log_level=args.log_level.lower(), log_config=None,
                timeout_graceful_shutdown=args.shutdown_timeout)


if __name__ == "__main__":
    main()
