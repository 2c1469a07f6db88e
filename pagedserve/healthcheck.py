"""python -m pagedserve.healthcheck grpc HOST:PORT | http URL — exit 0 when serving (for Docker)."""
from __future__ import annotations

import sys

from .launcher import grpc_serving, http_ok


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        sys.exit("usage: python -m pagedserve.healthcheck grpc HOST:PORT | http URL")
    kind, target = argv
    ok = grpc_serving(target) if kind == "grpc" else http_ok(target)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
