"""Taking a request in: the one path Generate and GenerateStream share from a GenerateRequest to a
request queued in the engine (or refused with the status its client gets), and the count of
requests in flight that a graceful shutdown waits for."""
from __future__ import annotations

import asyncio
import uuid

import grpc

from pagedserve.v1 import scheduler_pb2 as pb

from . import pooling as pooling_check
from .lora import lora_of
from . import validation
from .engine import Engine
from .outboxes import Outbox
from .scheduler import QueueFull
from .workers import WorkerLost


class Refused(Exception):
    """A request not queued: `code` is the gRPC status its client gets, `message` says what was
    wrong and what to do (for INVALID_ARGUMENT it starts with the field's name)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class InFlight:
    """Requests taken in and not ended, of Generate calls and GenerateStream calls alike: a graceful
    shutdown stops taking new ones (`accepting`) and waits for `idle`."""

    def __init__(self):
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.accepting = True

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self.idle.set()


async def accept(engine: Engine, info: pb.ModelInfo, request: pb.GenerateRequest,
                 outbox: Outbox) -> str:
    """Checks `request`, resolves its params (scheduler/validation.py) and queues it, its news
    going to `outbox`; returns its request_id (one the server made, if it had none).
    Raises Refused: INVALID_ARGUMENT (a field, or a structured-output constraint that does not
    compile), UNAVAILABLE (no worker serving, or one lost during the check), ALREADY_EXISTS (its
    request_id is in flight), RESOURCE_EXHAUSTED (the waiting queue is full)."""
    try:
        lora_of(request, engine.scheduler.config)
        embedding = pooling_check.check(request, info, engine.scheduler.kv)
        params, pooling = embedding or (validation.check(request, info, engine.scheduler.kv), None)
    except validation.InvalidRequest as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    if not engine.healthy:
        raise Refused(grpc.StatusCode.UNAVAILABLE, "no worker is serving; retry later")
    await check_structured_output(engine, params)
    # Checked after the await, with nothing awaited between it and add(): no twin slips in.
    request_id = request.request_id or uuid.uuid4().hex
    if request_id in engine.outboxes:
        raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                      f"request_id: {request_id!r} is already in flight")
    try:
        engine.add(request_id, list(request.prompt_token_ids), params, outbox,
                   list(request.resume_output_token_ids), pooling=pooling,
                   lora=lora_of(request, engine.scheduler.config))
    except QueueFull as e:
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
    return request_id


async def check_structured_output(engine: Engine, params: pb.SamplingParams) -> None:
    """A constraint that does not compile is refused here, before it is queued: a step never
    fails on it. The worker compiles it (the scheduler holds no tokenizer).
    Raises Refused: INVALID_ARGUMENT ("structured_outputs: ..."), UNAVAILABLE (worker lost)."""
    if not params.HasField("structured_outputs"):
        return
    try:
        error = await engine.workers.check_structured_output(params.structured_outputs)
    except WorkerLost as e:
        raise Refused(grpc.StatusCode.UNAVAILABLE, str(e)) from None
    if error:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"structured_outputs: {error}")
