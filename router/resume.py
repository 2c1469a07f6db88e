"""Resuming a request whose scheduler went away (its GenerateStream call broke: the process died,
was stopped, or left the replica set): the router re-sends it as a continuation
(GenerateRequest.resume_output_token_ids = every token it has received for it) to a healthy
replica, the restarted scheduler or another, which recomputes prompt + those tokens and goes on
as the undisturbed run would have (scheduler.proto says how). The client sees a pause: its
choice's detokenizer and stop strings (router/output.py) simply go on with the next tokens.

Only a request of one sequence (n = 1) is resumed; one that no healthy replica takes within
--resume-timeout fails with the error its call broke with, as before there were resumptions.
"""
from __future__ import annotations

import grpc

from pagedserve.router.stream import CallBroken
from pagedserve.v1 import scheduler_pb2 as pb


def resumable(request: pb.GenerateRequest, error: grpc.aio.AioRpcError, resumed: bool) -> bool:
    """Whether `error`, ending `request`, leaves it to be resumed: its call broke (not a refusal
    of the request itself), or, for a continuation already (`resumed`), the replica it went to
    had no worker serving yet."""
    if request.params.n > 1:
        return False
    if isinstance(error, CallBroken):  # CANCELLED: the router itself closed it (shutting down)
        return error.code() != grpc.StatusCode.CANCELLED
    return resumed and error.code() == grpc.StatusCode.UNAVAILABLE


def continuation(request: pb.GenerateRequest, output_ids: list[int],
                 attempt: int) -> pb.GenerateRequest:
    """`request` again, going on after `output_ids`, under a request_id of its own (the old
    scheduler, if it is still alive, may not have let go of the old one yet)."""
    again = pb.GenerateRequest()
    again.CopyFrom(request)
    again.request_id = f"{request.request_id}-resume{attempt}"
    del again.resume_output_token_ids[:]
    again.resume_output_token_ids.extend(output_ids)
    return again
