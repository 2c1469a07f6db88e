"""`pagedserve run-batch -i requests.jsonl -o results.jsonl --model DIR` (or `--base-url URL`).

Every request goes through the OpenAI HTTP API of the server, the one it starts or the one given, with
its body as it stands in the file: a result is what a client of that API would have got. Requests are
kept in flight up to --max-concurrency (by default the server's --max-num-seqs: the scheduler batches
them and queues the rest), and each result is appended the moment it arrives. A request the server
cannot answer now (no connection, 429, 5xx) is retried a few times and otherwise left without a
result line, so a rerun sends it again; the exit status is 1 when any was left.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from .batch_file import (BatchRequest, finished_keys, plan_batch, response_record,
                         write_record)
from .serve_args import add_serve_args
from .local_server import LocalServer, ServerStartError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 4
BACKOFF_S = 1.0  # times the attempt number


def add_run_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input-file", required=True, help="the requests, one JSON per line")
    p.add_argument("-o", "--output-file", required=True,
                   help="the results, appended; a rerun skips the requests it already holds")
    p.add_argument("--base-url", default=None,
                   help="a running server (http://HOST:PORT/v1); default: start one with the "
                   "serve flags below")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once; default: --max-num-seqs")
    p.add_argument("--disable-progress-bar", action="store_true")
    add_serve_args(p, model_required=False)


def run_batch(args: argparse.Namespace) -> int:
    output = Path(args.output_file)
    plan = plan_batch(Path(args.input_file), finished_keys(output))
    written = Tally()
    with open(output, "a", encoding="utf-8") as sink:
        for bad in plan.rejected:
            write_record(sink, bad.record())
        try:
            if plan.requests:
                with server(args) as root_url:
                    asyncio.run(send_all(plan.requests, root_url, sink, args, written))
        except KeyboardInterrupt:
            print("pagedserve run-batch: interrupted; run it again to finish", file=sys.stderr)
        except ServerStartError as exc:
            print(f"pagedserve run-batch: {exc}", file=sys.stderr)
    left = len(plan.requests) - written.count
    print(f"pagedserve run-batch: {written.count + len(plan.rejected)} results written to {output} "
          f"({len(plan.rejected)} for lines that could not be sent), {plan.skipped} already "
          f"there" + (f", {left} left for a rerun" if left else ""), file=sys.stderr)
    return 1 if left else 0


@contextmanager
def server(args: argparse.Namespace):
    """The root URL of the server to send to: the one given, or one started here for the run."""
    if args.base_url:
        yield root_of(args.base_url)
        return
    if not args.model:
        raise SystemExit("pagedserve run-batch: give --model DIR (to start a server) or "
                         "--base-url URL (of a running one).")
    signal.signal(signal.SIGTERM, interrupt)  # a `kill` must still stop the services started here
    with LocalServer(args) as local:
        print(f"pagedserve run-batch: serving {args.model} at {local.root_url}/v1 (its log: "
              f"{local.log_path})", file=sys.stderr)
        yield local.root_url


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def root_of(base_url: str) -> str:
    """The lines' urls start with /v1, so the base URL may be given with or without it."""
    url = base_url.rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


class Tally:
    """Results written so far: still right when the run is interrupted halfway."""
    count = 0


async def send_all(requests: list[BatchRequest], root_url: str, sink,
                   args: argparse.Namespace, written: Tally) -> None:
    """Sends the requests with at most --max-concurrency in flight."""
    import httpx

    from .progress import Progress
    concurrency = max(1, args.max_concurrency or args.max_num_seqs)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(None, connect=30.0)  # a long generation is no failure
    pending = iter(requests)  # shared by the senders: each takes the next request when it is free
    unreachable = False

    async def sender(client: httpx.AsyncClient, progress: Progress) -> None:
        nonlocal unreachable
        for request in pending:
            if unreachable:
                return
            try:
                record = await send(client, request, progress)
            except ServerGone:
                unreachable = True  # every request would fail the same way: leave them all
                return
            if record is None:
                continue
            write_record(sink, record)
            written.count += 1
            progress.done(output_tokens(record))

    with Progress(len(requests), "run-batch", not args.disable_progress_bar) as progress:
        async with httpx.AsyncClient(base_url=root_url, headers=headers, timeout=timeout,
                                     limits=limits) as client:
            await asyncio.gather(*(sender(client, progress)
                                   for _ in range(min(concurrency, len(requests)))))


async def send(client, request: BatchRequest, progress) -> dict | None:
    """The request's result record; None when the server kept failing it (5xx, 429), ServerGone
    when it could not be reached."""
    import httpx
    for attempt in range(1, ATTEMPTS + 1):
        try:
            reply = await client.post(request.url, json=request.body)
        except httpx.TransportError as exc:
            problem, reply = f"{type(exc).__name__}: {exc}", None
        else:
            if reply.status_code not in RETRY_STATUSES:
                return response_record(request, reply.status_code,
                                       reply.headers.get("x-request-id"), reply_body(reply))
            problem = f"HTTP {reply.status_code}: {reply.text[:300]}"
        if attempt < ATTEMPTS:
            await asyncio.sleep(BACKOFF_S * attempt)
    progress.write(f"pagedserve run-batch: custom_id {request.custom_id!r} (line {request.line}) "
                   f"failed {ATTEMPTS} times, last with {problem}")
    if reply is None:
        raise ServerGone(problem)
    return None


class ServerGone(Exception):
    pass


def reply_body(reply) -> object:
    try:
        return reply.json()
    except ValueError:  # not from our router (a proxy's error page): keep what it said
        return {"error": {"message": reply.text, "type": "server_error", "param": None,
                          "code": None}}


def output_tokens(record: dict) -> int:
    body = record["response"]["body"]
    usage = body.get("usage") if isinstance(body, dict) else None
    return usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
