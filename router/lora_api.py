"""vLLM's run-time LoRA endpoints: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, body
{"lora_name": ..., "lora_path": ...}, routed only with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (router/lora.py), and the adapters' cards in /v1/models."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from pagedserve.router.errors import APIError, invalid
from pagedserve.router.fields import Fields
from pagedserve.router.lora import LoraLoadError, runtime_updating_allowed
from pagedserve.router.model import ServedModel
from pagedserve.router.serving import read_json


def lora_routes(enable_lora: bool) -> list[Route]:
    if not (enable_lora and runtime_updating_allowed()):
        return []
    return [Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"])]


def adapter_cards(model: ServedModel) -> list[dict]:
    """The adapters as /v1/models lists them: `parent` the base model, `root` the directory."""
    if not model.loras:
        return []
    return [{"id": a.name, "object": "model", "created": a.created, "owned_by": "pagedserve",
             "root": a.path, "parent": model.name, "max_model_len": model.max_model_len}
            for a in model.loras.adapters.values()]


async def _names(request: Request, need_path: bool) -> tuple[str, str | None]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.")
    f = Fields(body)
    name, path = f.string("lora_name"), f.string("lora_path")
    if not name:
        raise invalid("lora_name", "'lora_name' is required.")
    if need_path and not path:
        raise invalid("lora_path", "'lora_path' is required.")
    return name, path


async def load_lora_adapter(request: Request) -> Response:
    model: ServedModel = request.app.state.frontend.model
    name, path = await _names(request, need_path=True)
    try:
        model.loras.add(name, path)
    except LoraLoadError as e:
        raise invalid("lora_path", str(e)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    model: ServedModel = request.app.state.frontend.model
    name, _ = await _names(request, need_path=False)
    if model.loras.remove(name) is None:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name",
                       "model_not_found")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
