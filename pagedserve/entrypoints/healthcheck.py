"""The one health probe of every process, for the launcher, the benchmarks, the tests and Docker:
`python -m pagedserve.entrypoints.healthcheck grpc HOST:PORT | http URL` exits 0 when serving."""
from __future__ import annotations

import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def grpc_serving(address: str) -> bool:
    """True when the gRPC server at HOST:PORT answers the standard health check with SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str) -> bool:
    """True when GET url answers 200 within 2 s (the router's /health)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        sys.exit("usage: python -m pagedserve.entrypoints.healthcheck grpc HOST:PORT | http URL")
    kind, target = argv
    ok = grpc_serving(target) if kind == "grpc" else http_ok(target)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
