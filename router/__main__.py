"""python -m router --model DIR --scheduler-addr 127.0.0.1:50051 [--port 8000] ..."""
from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from router.app import build_app
from router.settings import Settings


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
    p.add_argument("--max-model-len", type=int,
                   help="lower the context length the scheduler allows")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(scheduler_addr=args.scheduler_addr, model=args.model,
                        served_model_name=args.served_model_name, api_key=args.api_key,
                        chat_template=args.chat_template, max_model_len=args.max_model_len)
    uvicorn.run(build_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
