"""`pagedserve serve` from inside another program: the launcher's worker, scheduler and router (for
run-batch, which speaks HTTP) or, headless, the worker and scheduler alone (for the offline LLM,
whose front end runs in its own process) as child processes on free local ports, their output in a
log file (it would tear a progress bar apart), stopped on close or at interpreter exit."""
from __future__ import annotations

import argparse
import atexit
import logging
import tempfile

from .serve_args import add_serve_args
from .launcher import Launcher, free_port

log = logging.getLogger("pagedserve")

LOG_TAIL_CHARS = 4000  # of the children's log, shown when they fail to start
# serve's flags that a LocalServer sets itself: loopback, and ports of its own that must not collide
# with a server already running.
CHOSEN_HERE = ("host", "port", "grpc_port")


class ServerStartError(RuntimeError):
    """A child died or never got healthy; the message ends with their log."""


def serve_args(model: str, **flags) -> argparse.Namespace:
    """`pagedserve serve`'s flags with their defaults, and the given ones in their Python spelling
    (max_num_seqs=64 for --max-num-seqs 64). Raises TypeError naming a flag serve does not take,
    or one that a LocalServer chooses itself (host, port, grpc_port)."""
    parser = argparse.ArgumentParser(prog="pagedserve serve")
    add_serve_args(parser)
    args = parser.parse_args(["--model", str(model)])
    for name, value in flags.items():
        if name in CHOSEN_HERE:
            raise TypeError(f"{name!r} is chosen by the local server itself (loopback, free "
                            "ports): leave it out")
        if not hasattr(args, name):
            raise TypeError(f"{name!r} is not an option of `pagedserve serve` (see its --help; "
                            "write --max-num-seqs as max_num_seqs)")
        setattr(args, name, value)
    return args


class LocalServer:
    def __init__(self, args: argparse.Namespace, headless: bool = False):
        """args: `pagedserve serve`'s (serve_args). headless: no router, so no HTTP port and
        root_url None; the scheduler answers gRPC at grpc_address either way."""
        # On loopback and on ports of its own: it must not collide with a server already running.
        port = None if headless else free_port()
        # One free port per replica's scheduler (--data-parallel-size): grpc_port + i may be taken.
        grpc_ports = [free_port() for _ in range(getattr(args, "data_parallel_size", 1) or 1)]
        self.args = argparse.Namespace(**{**vars(args), "host": "127.0.0.1", "port": port,
                                          "grpc_port": grpc_ports[0], "grpc_ports": grpc_ports})
        self.headless = headless
        self.root_url = None if headless else f"http://127.0.0.1:{port}"
        self.grpc_address = f"127.0.0.1:{self.args.grpc_port}"
        self.grpc_addresses = [f"127.0.0.1:{p}" for p in grpc_ports]  # every replica's
        self.log_file = tempfile.NamedTemporaryFile(prefix="pagedserve-", suffix=".log",
                                                    delete=False)
        self.launcher = Launcher(self.args, output=self.log_file, headless=headless)
        self.stopped = False

    @property
    def log_path(self) -> str:
        return self.log_file.name

    def start(self) -> "LocalServer":
        log.info("starting the %s of %s (their log: %s)",
                 "worker and scheduler" if self.headless else "worker, scheduler and router",
                 self.args.model, self.log_path)
        atexit.register(self.stop)
        try:
            self.launcher.start_all()
        except SystemExit as exc:  # the launcher's way to say a child died or never got healthy
            self.stop()
            raise ServerStartError(f"{exc}; the end of {self.log_path}:\n{self.log_tail()}") \
                from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.stop)
        self.launcher.stop_children()
        self.log_file.close()

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-LOG_TAIL_CHARS:]

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
