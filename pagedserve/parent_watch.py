"""A child of `pagedserve serve` stops when the launcher does, however the launcher ended.

The launcher puts its children in process groups of their own (so Ctrl-C reaches only it), which
also means nothing stops them if the launcher is SIGKILLed: they would hold ports and memory
forever. Each child therefore watches its parent and, once it is gone, sends itself SIGTERM: the
same graceful shutdown as `pagedserve serve` stopping it."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

PARENT_ENV = "PAGEDSERVE_PARENT_PID"  # set by the launcher for the children it starts

log = logging.getLogger(__name__)


def stop_with_parent(poll_seconds: float = 1.0) -> None:
    # Taken out of the environment so that this process's own children do not watch the launcher.
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return  # started by hand or by compose: its lifetime is its supervisor's business
    threading.Thread(target=_watch, args=(int(parent), poll_seconds), daemon=True,
                     name="parent-watch").start()


RESEND_SECONDS = 60.0  # a SIGTERM that came before the process's own handler was ready is lost


def _watch(parent: int, poll_seconds: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    log.warning("the launcher (pid %d) is gone: shutting down", parent)
    while True:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(RESEND_SECONDS)
