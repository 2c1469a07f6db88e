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

from pagedserve.flags import max_num_seqs_flag, option

from .batch_file import (BatchRequest, finished_keys, plan_batch, response_record,
                         write_record)
from .serve_args import add_serve_args
from .local_server import CHOSEN_HERE, LocalServer, ServerStartError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 4
BACKOFF_S = 1.0  # times the attempt number
REACH_TIMEOUT_S = 10.0  # for the one check that --base-url answers
# Of serve's flags, what still means something for a server run-batch did not start: the key it
# sends.
BASE_URL_FLAGS = ("api_key",)


def add_run_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input-file", required=True, help="the requests, one JSON per line")
    p.add_argument("-o", "--output-file", required=True,
                   help="the results, appended; a rerun skips the requests it already holds")
    p.add_argument("--base-url", default=None,
                   help="a running server (http://HOST:PORT/v1), checked once at the start (GET "
                   "/v1/models); default: start one with the server flags below")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once (default: --max-num-seqs, which is "
                   f"{max_num_seqs_flag().default} with --base-url)")
    p.add_argument("--disable-progress-bar", action="store_true",
                   help="no progress line on stderr")
    server = p.add_argument_group(
        "server flags", "those of `pagedserve serve`, for the server run-batch starts when no "
        "--base-url is given (it listens on loopback, on free ports). With --base-url only "
        "--api-key applies (sent to that server); the others are refused.")
    add_serve_args(server, model_required=False, skip=CHOSEN_HERE)


def server_flag_names() -> set[str]:
    """The argparse dests of the server flags run-batch takes."""
    return add_serve_args(argparse.ArgumentParser(), model_required=False, skip=CHOSEN_HERE)


def refuse_flags_base_url_ignores(parser: argparse.ArgumentParser, argv: list[str],
                                  args: argparse.Namespace) -> None:
    """With --base-url, exits through parser.error (status 2) naming every server flag in `argv`
    (run-batch's own arguments) that the running server would not hear."""
    if not args.base_url:
        return
    names = given_flags(parser, argv) & (server_flag_names() - set(BASE_URL_FLAGS))
    if names:
        ignored = ", ".join(option(a.dest) for a in parser._actions if a.dest in names)
        parser.error(f"with --base-url, the running server keeps its own settings, so "
                     f"{ignored} would be ignored; of the server flags only --api-key applies "
                     "with --base-url (drop the others, or drop --base-url to start a server "
                     "with them)")


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options that `argv` gives, however spelled (`-tp 2`, an abbreviation):
    argv parsed again into a namespace that holds a marker for every option, which only an
    option given replaces (argparse fills in defaults only where the namespace has nothing)."""
    unset = object()
    marked = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_known_args(argv, marked)
    return {name for name, value in vars(marked).items() if value is not unset}


def run_batch(args: argparse.Namespace) -> int:
    if args.base_url:  # before anything is written: a wrong URL leaves no trace
        try:
            check_reachable(root_of(args.base_url), args.api_key)
        except ServerUnreachable as exc:
            print(f"pagedserve run-batch: {exc}", file=sys.stderr)
            return 1
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
    if args.base_url:  # checked by run_batch before it opened the output
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


class ServerUnreachable(Exception):
    """--base-url did not answer GET /v1/models with 200."""


def check_reachable(root_url: str, api_key: str | None) -> None:
    """Raises ServerUnreachable unless the server at root_url lists its models for this key: a
    wrong URL, a server that is down or a wrong key then fails the run at once, not each request
    after its retries."""
    import httpx
    url = f"{root_url}/v1/models"
    try:
        reply = httpx.get(url, headers=auth_headers(api_key), timeout=REACH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"--base-url: cannot reach {url} ({type(exc).__name__}: {exc}); "
                                "is the server up and the URL right?") from None
    if reply.status_code == 401:
        raise ServerUnreachable(f"--base-url: {url} refused the API key (HTTP 401): give the "
                                "server's key with --api-key or PAGEDSERVE_API_KEY")
    if reply.status_code != 200:
        raise ServerUnreachable(f"--base-url: {url} answered HTTP {reply.status_code} "
                                f"({reply.text[:300]!r}); is this an OpenAI-compatible server?")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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
    headers = auth_headers(args.api_key)
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
