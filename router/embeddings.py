"""POST /v1/embeddings: one scheduler request per input (GenerateRequest.pooling), sent on the
router's one GenerateStream call like any generation (router/generation.py), so embeddings share
the continuous batching and the prefix cache; each comes back as one message holding its vector.

The answer is OpenAI's CreateEmbeddingResponse: `object: "list"`, `data` (one
`{object: "embedding", index, embedding}` per input, in input order), `model`, `usage`
(prompt_tokens = total_tokens: nothing is generated); vLLM's `id` and `created` beside them.
`encoding_format: "base64"` sends each vector as the base64 of its little-endian float32 bytes,
which is what the openai SDK asks for by default and decodes (numpy.frombuffer(..., "float32")).
"""
from __future__ import annotations

import base64
import struct
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.router.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, until_disconnect
from pagedserve.router.errors import scheduler_unavailable
from pagedserve.router.embedding_request import EmbeddingRequest, parse_embedding
from pagedserve.router.frontend import Frontend
from pagedserve.router.generation import Generation, start_generation
from pagedserve.router.serving import grpc_request_id, read_json
from pagedserve.v1 import scheduler_pb2 as pb


def encode(vector, encoding_format: str) -> list[float] | str:
    """`vector` (floats) as OpenAI's `embedding` field: the list, or base64 of float32 little-endian."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def response_body(req: EmbeddingRequest, vectors: list, prompt_tokens: int, model: str,
                   response_id: str) -> dict:
    return {"id": response_id, "object": "list", "created": int(time.time()), "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


async def serve_embeddings(request: Request) -> Response:
    arrival = time.perf_counter()
    frontend: Frontend = request.app.state.frontend
    model = frontend.model
    req = parse_embedding(await read_json(request), model)
    requests = [pb.GenerateRequest(request_id=grpc_request_id(request, i), prompt_token_ids=ids,
                                   pooling=req.pooling)
                for i, ids in enumerate(req.prompts)]
    metrics = frontend.metrics
    try:
        generation = await until_disconnect(request, start_generation(frontend.replicas, requests))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    metrics.request_started()
    finished = "abort"
    try:
        vectors = await until_disconnect(request, collect(generation, len(requests)))
        finished = "stop"
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        generation.close()  # aborts what still runs (an error, a client gone)
        metrics.request_finished(time.perf_counter() - arrival, [finished] * len(requests))
    body = response_body(req, vectors, sum(len(p) for p in req.prompts), model.name,
                         f"embd-{request.state.request_id}")
    return JSONResponse(body)


async def collect(generation: Generation, count: int) -> list:
    """Each input's vector, in input order. Raises APIError as the scheduler's status maps."""
    vectors: list = [None] * count
    while (item := await generation.next()) is not None:
        index, message = item
        if message.embedding:
            vectors[index] = message.embedding
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:  # the scheduler ended a request without its vector (aborted while it ran)
        raise scheduler_unavailable(f"input {missing[0]} ended without an embedding")
    return vectors
