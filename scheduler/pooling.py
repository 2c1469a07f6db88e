"""Embedding requests (GenerateRequest.pooling) checked and resolved before they are queued.

A model is served either for generation or for pooling (ModelInfo.runner, as its workers resolved
vLLM's --runner): each takes only its own kind of request. An embedding request's PoolingParams
take the model's pooling type and normalisation where unset (ModelInfo.pooler); `dimensions` is
allowed only where the model declares matryoshka representations (vLLM's rule and wording). Its
sampling params are empty, resolved to the proto's defaults with max_tokens 0: the sequence
computes its prompt and nothing more. The prompt may fill the whole context (nothing follows it).
"""
from __future__ import annotations

from pagedserve.v1 import scheduler_pb2 as pb

from .kv_cache_manager import KVCacheManager
from .validation import InvalidRequest, check_length, check_prompt, with_defaults


def is_pooling_model(info: pb.ModelInfo) -> bool:
    return info.runner == "pooling"


def check(request: pb.GenerateRequest, info: pb.ModelInfo,
          kv: KVCacheManager) -> tuple[pb.SamplingParams, pb.PoolingParams] | None:
    """None for a generation request to a generating model (validation.check takes it); else the
    embedding request's resolved (SamplingParams, PoolingParams). Raises InvalidRequest naming
    the field: `pooling` for a request of the other kind than the model serves."""
    wants_pooling = request.HasField("pooling")
    if not is_pooling_model(info):
        if wants_pooling:
            raise InvalidRequest("pooling: this model is served for generation, not embeddings "
                                 "(serve an embedding model, or this one with --runner pooling)")
        return None
    if not wants_pooling:
        raise InvalidRequest("pooling: this model is served for embeddings (--runner pooling): it "
                             "generates no text; send embedding requests (GenerateRequest.pooling)")
    if request.params.ByteSize():
        raise InvalidRequest("params: an embedding request takes no sampling parameters")
    prompt = request.prompt_token_ids
    check_prompt(prompt, info.vocab_size, len(prompt) + 1)  # emptiness and ids; its length below
    if len(prompt) > info.max_model_len:  # nothing follows it: it may fill the whole context
        raise InvalidRequest(f"prompt_token_ids: the prompt has {len(prompt)} tokens, but the "
                             f"maximum context length is {info.max_model_len}")
    check_length(len(prompt), 0, info.max_model_len, kv)
    pooling = resolve(request.pooling, info)
    params = with_defaults(pb.SamplingParams())
    params.max_tokens = 0
    return params, pooling


def resolve(requested: pb.PoolingParams, info: pb.ModelInfo) -> pb.PoolingParams:
    """The model's pooler with the request's fields on top, `dimensions` checked."""
    pooling = pb.PoolingParams()
    pooling.CopyFrom(info.pooler)
    pooling.MergeFrom(requested)
    if pooling.pooling_type not in (pb.POOLING_TYPE_LAST, pb.POOLING_TYPE_MEAN, pb.POOLING_TYPE_CLS):
        raise InvalidRequest(f"pooling_type: must be LAST, MEAN or CLS, got {pooling.pooling_type}")
    if requested.HasField("dimensions"):
        check_dimensions(requested.dimensions, info)
    return pooling


def check_dimensions(dimensions: int, info: pb.ModelInfo) -> None:
    name = info.served_model_name or info.model_path
    if not info.is_matryoshka:
        raise InvalidRequest(f"dimensions: model \"{name}\" does not support matryoshka representation, "
                             "changing output dimensions will lead to poor results")
    if dimensions < 1:
        raise InvalidRequest("dimensions: must be greater than 0")
    allowed = list(info.matryoshka_dimensions)
    if allowed and dimensions not in allowed:
        raise InvalidRequest(f"dimensions: model \"{name}\" only supports {allowed} matryoshka "
                             "dimensions, use other output dimensions will lead to poor results")
    if info.hidden_size and dimensions > info.hidden_size:
        raise InvalidRequest(f"dimensions: must be at most the model's hidden size {info.hidden_size}, "
                             f"got {dimensions}")
