"""Running the router for tests: a real uvicorn on a free port against the fake scheduler, both on
one background event loop (grpc.aio keeps to one loop), driven from the test's thread over HTTP."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Coroutine

import uvicorn

from pagedserve.router.app import build_app
from pagedserve.router.settings import Settings
from tests.helpers.fake_scheduler import FakeScheduler, FakeSchedulerServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An event loop on a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RunningRouter:
    def __init__(self, loop: LoopThread, settings: Settings):
        self.loop = loop
        self.port = free_port()
        config = uvicorn.Config(build_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.task = asyncio.run_coroutine_threadsafe(self.server.serve(), loop.loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_started(self, timeout: float = 60.0) -> "RunningRouter":
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.task.result(15)


class Harness:
    """A fake scheduler and routers in front of it, sharing one loop."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: list[int]):
        self.loop = LoopThread()
        self.fake = FakeScheduler(vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                                  model_path=model_dir, served_model_name="smol")
        self.scheduler = FakeSchedulerServer(self.fake)
        self.loop.run(self.scheduler.start())
        self.routers: list[RunningRouter] = []

    def router(self, **settings: Any) -> RunningRouter:
        settings.setdefault("connect_timeout_s", 0.5)
        settings.setdefault("startup_retry_s", 0.2)
        running = RunningRouter(self.loop, Settings(scheduler_addr=self.scheduler.address,
                                                    **settings))
        self.routers.append(running)
        return running.wait_started()

    def stop_scheduler(self) -> None:
        self.loop.run(self.scheduler.stop())

    def start_scheduler(self) -> None:
        self.loop.run(self.scheduler.start())

    def close(self) -> None:
        for running in self.routers:
            running.stop()
        self.loop.run(self.scheduler.stop())
        self.loop.close()


# ----- what the router's tests say to it and read back -----------------------------------------------

EOS = 2  # <|im_end|>
IM_START = 1


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def say(fake, tokenizer, text: str) -> list[int]:
    """Makes the fake "model" write `text` (then EOS), whatever the prompt."""
    ids = ids_of(tokenizer, text)
    fake.script = lambda prompt, params, index: ids
    return ids


def chat(client, stream=False, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    kw.setdefault("model", "smol")
    return client.chat.completions.create(stream=stream, **kw)


def streamed_text(chunks, kind="chat") -> tuple[dict[int, str], dict[int, str], list]:
    texts, reasons, rest = {}, {}, []
    for c in chunks:
        if not c.choices:
            rest.append(c)
        for ch in c.choices:
            piece = (ch.delta.content or "") if kind == "chat" else ch.text
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, rest


def eventually(check, timeout=60.0):
    """Waits until check() holds; the timeout is generous (the machine may be busy), and a
    check that holds returns at once."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
