"""--api-key on the public gRPC API: `authorization: Bearer KEY` metadata, else UNAUTHENTICATED.
Health and reflection stay open, so that orchestrators and generic tools can probe the service."""
from __future__ import annotations

import hmac

import grpc

PROTECTED_PREFIX = "/pagedserve.v1.Scheduler/"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self.expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX) or self.authorized(details):
            return handler  # None: an unknown method, which gRPC answers with UNIMPLEMENTED
        return self.refusal(handler)

    def authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self.expected)
        return False

    @staticmethod
    def refusal(handler):
        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer KEY'")

        async def deny_stream(request, context):
            await deny_unary(request, context)
            yield  # pragma: no cover - makes this an async generator, as the handler expects

        if handler.request_streaming and handler.response_streaming:  # GenerateStream
            return grpc.stream_stream_rpc_method_handler(
                deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
