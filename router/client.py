"""The router's gRPC client to the scheduler.

One channel for the router's life, and on it one GenerateStream call (router/stream.py) that
carries every request: opened by the first request, opened again by the first after it broke.
gRPC reconnects a channel by itself; the backoff is kept short so a restarted scheduler is found
again within a second or two, and a request arriving while the scheduler is away waits briefly
for it (connect_timeout_s) before it fails with 503.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from pagedserve.v1 import scheduler_pb2 as pb
from pagedserve.v1 import scheduler_pb2_grpc as pb_grpc
from pagedserve.router.errors import scheduler_unavailable
from pagedserve.router.stream import GenerateStream

log = logging.getLogger("pagedserve.router")

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class SchedulerClient:
    def __init__(self, address: str, connect_timeout_s: float = 3.0, api_key: str | None = None):
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        # A scheduler started with --api-key wants the same key, as gRPC metadata.
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._stream: GenerateStream | None = None

    async def model_info(self, timeout_s: float = 5.0) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s,
                                             metadata=self._metadata)

    async def wait_for_model_info(self, retry_s: float = 2.0) -> pb.ModelInfo:
        """GetModelInfo, retried until the scheduler answers: the router may start before it."""
        attempt = 0
        while True:
            attempt += 1
            try:
                # channel_ready returns as soon as a connection is made: no fixed sleep to wait out.
                await asyncio.wait_for(self._channel.channel_ready(), retry_s)
                return await self.model_info()
            except (asyncio.TimeoutError, grpc.aio.AioRpcError) as err:
                refused = isinstance(err, grpc.aio.AioRpcError)
                log.info("waiting for the scheduler at %s (attempt %d: %s)", self.address,
                         attempt, err.code().name if refused else "no connection")
                if refused:
                    await asyncio.sleep(retry_s)

    async def stats(self, timeout_s: float = 2.0) -> pb.SchedulerStats:
        return await self._stub.GetStats(pb.GetStatsRequest(), timeout=timeout_s,
                                         metadata=self._metadata)

    async def stream(self) -> GenerateStream:
        """The GenerateStream call to start requests on, opened if there is none or it broke.
        Raises APIError 503 (scheduler_unavailable) if no connection comes within
        connect_timeout_s."""
        await self._connected()
        if self._stream is None or self._stream.broken:
            self._stream = GenerateStream(self._stub, self._metadata)
        return self._stream

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # the scheduler aborts whatever still runs on it
        await self._channel.close()

    async def _connected(self) -> None:
        state = self._channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise scheduler_unavailable(
                f"no connection to {self.address} within {self.connect_timeout_s:g}s") from None
