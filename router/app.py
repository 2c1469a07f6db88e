"""The router's HTTP application: routes, middleware, and startup.

Startup connects the front end (router/frontend.py, shared with the offline LLM): it waits for the
scheduler to answer GetModelInfo (uvicorn accepts no connection before the lifespan has started),
then loads the tokenizer of the model it serves.
"""
from __future__ import annotations

import contextlib
import logging

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import pagedserve
from pagedserve.router.cors import cors_middleware
from pagedserve.router.embeddings import serve_embeddings
from pagedserve.router.errors import (APIError, handle_api_error, handle_http_exception, handle_unexpected,
                           invalid, model_not_found, scheduler_unavailable)
from pagedserve.router.fields import Fields
from pagedserve.router.frontend import Frontend
from pagedserve.router.metrics import Metrics, MetricsMiddleware
from pagedserve.router.lora_api import adapter_cards, lora_routes
from pagedserve.router.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from pagedserve.router.model import ServedModel
from pagedserve.router.replica_metrics import ReplicaCollector
from pagedserve.router.prompts import chat_messages, chat_prompt
from pagedserve.router.protocol import chat_template_options, check_model
from pagedserve.router.serving import read_json, serve_chat, serve_completion
from pagedserve.router.settings import Settings
from pagedserve.router.response_store import ResponseStore
from pagedserve.router.serving_responses import create_response, delete_response, get_response

log = logging.getLogger("pagedserve.router")


def build_app(settings: Settings) -> Starlette:
    metrics = Metrics(settings.metrics_prefix)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        frontend = await Frontend.connect(settings, metrics)
        app.state.frontend = frontend
        metrics.bind(frontend.model.name)
        metrics.registry.register(ReplicaCollector(frontend.replicas))
        log.info("serving %s (max_model_len %d) with scheduler %s", frontend.model.name,
                 frontend.model.max_model_len, settings.scheduler_addrs or settings.scheduler_addr)
        try:
            yield
        finally:
            await frontend.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", serve_chat, methods=["POST"]),
            Route("/v1/completions", serve_completion, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/metrics", metrics.render, methods=["GET"]),
            Route("/v1/embeddings", serve_embeddings, methods=["POST"]),
            Route("/v1/responses", create_response, methods=["POST"]),
            Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
            Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
            *lora_routes(settings.enable_lora),
        ],
        middleware=[*cors_middleware(settings.allowed_origins, settings.allowed_methods,
                                     settings.allowed_headers, settings.allow_credentials),
                    Middleware(RequestIdMiddleware), Middleware(MetricsMiddleware, metrics),
                    Middleware(ApiKeyMiddleware, settings.api_key),
                    Middleware(BodyLimitMiddleware, settings.max_request_body_bytes)],
        exception_handlers={APIError: handle_api_error, HTTPException: handle_http_exception,
                            Exception: handle_unexpected},
        lifespan=lifespan,
    )
    app.state.response_store = ResponseStore(settings.max_stored_responses)
    return app


def model_card(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created,
            "owned_by": "pagedserve", "root": model.path, "parent": None,
            "max_model_len": model.max_model_len}


async def list_models(request: Request) -> Response:
    model: ServedModel = request.app.state.frontend.model
    return JSONResponse({"object": "list", "data": [model_card(model), *adapter_cards(model)]})


async def get_model(request: Request) -> Response:
    model: ServedModel = request.app.state.frontend.model
    cards = {card["id"]: card for card in [model_card(model), *adapter_cards(model)]}
    if request.path_params["model"] not in cards:
        raise model_not_found(request.path_params["model"], model.name)
    return JSONResponse(cards[request.path_params["model"]])


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered through the chat template."""
    model: ServedModel = request.app.state.frontend.model
    f = Fields(await read_object(request))
    check_model(f.string("model"), model)
    if f.given("messages"):
        ids = chat_prompt(chat_messages(f.raw("messages")), model.tokenizer,
                          **chat_template_options(f)).token_ids
    elif f.given("prompt"):
        ids = model.tokenizer.encode(f.string("prompt"), f.boolean("add_special_tokens", True))
    else:
        raise invalid("prompt", "Give 'prompt' (a string) or 'messages' (a chat).")
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len})


async def detokenize(request: Request) -> Response:
    model: ServedModel = request.app.state.frontend.model
    f = Fields(await read_object(request))
    check_model(f.string("model"), model)
    if not f.given("tokens"):
        raise invalid("tokens", "'tokens' (an array of token ids) is required.")
    ids = f.integers("tokens", 0, model.vocab_size)
    return JSONResponse({"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)})


async def read_object(request: Request) -> dict:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.")
    return body


async def health(request: Request) -> Response:
    """200 only when a scheduler (of any replica) answers and reports its workers healthy."""
    stats, _ = await request.app.state.frontend.replicas.stats()
    if stats is None:
        return scheduler_unavailable("no scheduler answers").response()
    if not stats.workers_healthy:
        return APIError(503, "The scheduler reports unhealthy workers.",
                        "service_unavailable_error", code="workers_unhealthy").response()
    return JSONResponse({"status": "ok"})


async def version(request: Request) -> Response:
    return JSONResponse({"version": pagedserve.__version__})
