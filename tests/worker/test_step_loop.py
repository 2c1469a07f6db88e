"""worker/step_loop.py: calls from gRPC threads run on the serving thread, and a call made after
the loop closed fails instead of waiting forever (a handler stuck there kept the worker alive)."""
import threading

import pytest

from pagedserve.worker.step_loop import StepLoop


def test_calls_run_on_the_serving_thread_and_errors_come_back():
    loop, until, seen = StepLoop(), threading.Event(), {}

    def client():
        seen["thread"] = loop.call(threading.get_ident)
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: 1 / 0)
        until.set()
    threading.Thread(target=client).start()
    loop.serve(until=until)
    assert seen["thread"] == threading.get_ident()


def test_a_call_after_close_fails():
    loop = StepLoop()
    loop.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        loop.call(lambda: "never run")
