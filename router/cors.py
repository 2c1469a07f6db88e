"""CORS, for clients that run in a browser: Starlette's CORSMiddleware behind vLLM's four flags.

Off unless --allowed-origins is given (a browser then gets no CORS headers, so pages of other
origins cannot call the API). The flags are router/settings.py's; their lists are JSON, as vLLM
takes them: --allowed-origins '["*"]'.
"""
from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware


def cors_middleware(origins: list[str] | None, methods: list[str], headers: list[str],
                    credentials: bool) -> list[Middleware]:
    """The middleware to put outermost (a preflight must not need an API key), or none."""
    if origins is None:
        return []
    return [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=methods,
                       allow_headers=headers, allow_credentials=credentials)]
