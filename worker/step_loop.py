"""Every step of a worker runs on one thread: the main thread, which also loaded the model.

Why: libgomp (torch's OpenMP) keeps a team of threads for each thread that enters a parallel
region. Loading the model on the main thread and running steps on a gRPC handler thread made two
teams, more OpenMP threads than cores, and libgomp then stops spinning between parallel regions:
every op of a step paid a futex wake-up. Measured on 2 cores: steps run from a second thread kept
1.6-1.7 cores busy, from the loading thread 1.99, and took 5-10% less time.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout


class StepLoop:
    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = threading.Event()

    def call(self, fn, *args):
        """Run fn(*args) on the serving thread and return its result (from any thread)."""
        done: Future = Future()
        self.jobs.put((fn, args, done))
        while True:
            try:
                return done.result(timeout=0.5)
            except FutureTimeout:
                # Asked after the loop closed: nobody will run it, and a handler thread waiting
                # forever would keep the process from exiting.
                if self.closed.is_set() and done.cancel():
                    raise RuntimeError("the worker is shutting down") from None

    def serve(self, until: threading.Event, poll_seconds: float = 0.05) -> None:
        """Run calls on this thread until `until` is set."""
        while not until.is_set():
            try:
                fn, args, done = self.jobs.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    done.set_exception(e)

    def close(self) -> None:
        """Fail the calls nobody will run (the process is going away)."""
        self.closed.set()
        while True:
            try:
                _, _, done = self.jobs.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(RuntimeError("the worker is shutting down"))
