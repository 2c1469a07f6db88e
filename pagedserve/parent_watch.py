"""A child of `pagedserve serve` stops when the launcher does, however the launcher ended.

The launcher puts its children in process groups of their own (so Ctrl-C reaches only it), which
also means nothing stops them if the launcher is SIGKILLed: they would hold ports and memory
forever. Each child therefore watches its parent and, once it is gone, sends itself SIGTERM: the
same graceful shutdown as `pagedserve serve` stopping it. Nobody is left to kill a child whose
graceful shutdown hangs, so the child also arms a deadline that ends it whatever it is doing
(loading weights, in a step, in a gRPC server's shutdown, in a non-daemon thread's join)."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time

PARENT_ENV = "PAGEDSERVE_PARENT_PID"  # set by the launcher for the children it starts
# An orphan's whole graceful shutdown: requests in flight get this long, then the process ends.
ORPHAN_EXIT_S = 10.0

log = logging.getLogger(__name__)


def stop_with_parent(poll_seconds: float = 1.0) -> None:
    # Taken out of the environment so that this process's own children do not watch the launcher.
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return  # started by hand or by compose: its lifetime is its supervisor's business
    threading.Thread(target=_watch, args=(int(parent), poll_seconds), daemon=True,
                     name="parent-watch").start()


_deadline: float | None = None  # time.monotonic() at which exit_within ends this process


def exit_within(seconds: float) -> None:
    """Ends this process `seconds` from now if it is still running: writes every thread's stack
    to stderr (what held it up), then _exit(1). faulthandler's timer is a C thread that needs
    neither the GIL nor the main thread, so a process stuck in native code ends too. A later
    call only ever brings the deadline closer. Safe in a signal handler (takes no lock)."""
    global _deadline
    deadline = time.monotonic() + seconds
    if _deadline is None or deadline < _deadline:
        _deadline = deadline
        faulthandler.dump_traceback_later(seconds, exit=True)


def exit_within_after_signal(seconds: float, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """From the moment one of `signals` arrives, this process has `seconds` to end (exit_within).
    Armed by a thread of its own that Python's C-level signal handler wakes through
    signal.set_wakeup_fd: Python runs signal handlers on the main thread only, and the main
    thread may be the one that is stuck. Call from the main thread, once its handlers for
    `signals` are installed; not in a process whose asyncio loop handles signals (it owns the
    wakeup fd)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd's requirement: a signal never blocks on it
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    wanted = {int(s) for s in signals}

    def wait() -> None:
        while not wanted & set(os.read(read_end, 64)):
            pass
        exit_within(seconds)
    threading.Thread(target=wait, daemon=True, name="exit-after-signal").start()


def _watch(parent: int, poll_seconds: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    log.warning("the launcher (pid %d) is gone: shutting down (exiting within %.0f s)", parent,
                ORPHAN_EXIT_S)
    # Armed before the signal: a SIGTERM that came before the process's own handler was ready
    # is lost, and a graceful shutdown may hang; either way the deadline ends the process.
    exit_within(ORPHAN_EXIT_S)
    os.kill(os.getpid(), signal.SIGTERM)
