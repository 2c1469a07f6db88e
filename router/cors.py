"""CORS, for clients that run in a browser: Starlette's CORSMiddleware behind vLLM's four flags.

Off unless --allowed-origins is given (a browser then gets no CORS headers, so pages of other
origins cannot call the API). The lists are JSON, as vLLM takes them: --allowed-origins '["*"]'.
"""
from __future__ import annotations

import argparse
import json

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware


def json_list(text: str) -> list[str]:
    """A flag's JSON array of strings; argparse reports a ValueError as a bad value."""
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a JSON array of strings")
    return value


json_list.__name__ = "JSON list"  # argparse names the type in its error message


def add_cors_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-origins", type=json_list, default=None,
                   help='origins allowed to call the API from a browser, as JSON: \'["*"]\' or '
                   '\'["https://app.example"]\'; default: CORS off')
    p.add_argument("--allowed-methods", type=json_list, default=["*"],
                   help="HTTP methods allowed across origins, as JSON (with --allowed-origins)")
    p.add_argument("--allowed-headers", type=json_list, default=["*"],
                   help="request headers allowed across origins, as JSON (with --allowed-origins)")
    p.add_argument("--allow-credentials", action="store_true",
                   help="let browsers send cookies and auth headers across origins")


def cors_flags(args: argparse.Namespace) -> list[str]:
    """The CORS flags of `args` again, for a child process's command line."""
    if args.allowed_origins is None:
        return []
    flags = ["--allowed-origins", json.dumps(args.allowed_origins),
             "--allowed-methods", json.dumps(args.allowed_methods),
             "--allowed-headers", json.dumps(args.allowed_headers)]
    return flags + (["--allow-credentials"] if args.allow_credentials else [])


def cors_middleware(origins: list[str] | None, methods: list[str], headers: list[str],
                    credentials: bool) -> list[Middleware]:
    """The middleware to put outermost (a preflight must not need an API key), or none."""
    if origins is None:
        return []
    return [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=methods,
                       allow_headers=headers, allow_credentials=credentials)]
