"""Watching a running `pagedserve serve` from outside: its processes (found through /proc: which
pid is the router, the scheduler, the worker; how many file descriptors one holds), its /health
and its /metrics."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROLES = ("worker", "scheduler", "router")


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command may hold spaces and parentheses


def role_of(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == b"-m" and argv[i + 1].decode().removeprefix("pagedserve.") in ROLES:
            return argv[i + 1].decode().removeprefix("pagedserve.")
    return None


def children(launcher_pid: int) -> dict[str, int]:
    """{"worker": pid, "scheduler": pid, "router": pid} of the launcher's live children (one
    worker rank)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_of(int(entry)) == launcher_pid:
            role = role_of(int(entry))
            if role is not None and not is_zombie(int(entry)):
                found[role] = int(entry)
    return found


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for_child(launcher_pid: int, role: str, not_pid: int | None = None,
                   timeout: float = 60.0) -> int:
    """The pid of the launcher's `role` child, waiting until there is one other than `not_pid`."""
    deadline = time.monotonic() + timeout
    while True:
        pid = children(launcher_pid).get(role)
        if pid is not None and pid != not_pid:
            return pid
        assert time.monotonic() < deadline, f"no new {role} process after {timeout:.0f} s"
        time.sleep(0.2)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(root_url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels without model_name): value}."""
    reply = httpx.get(root_url + "/metrics", timeout=10)
    assert reply.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[(s.name, labels)] = s.value
    return samples


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def poll(check, timeout: float, interval: float = 0.1):
    """Calls check() until it returns something truthy; returns (that, seconds it took)."""
    started = time.monotonic()
    while True:
        result = check()
        if result:
            return result, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"not within {timeout:.0f} s"
        time.sleep(interval)


def health_status(root_url: str) -> int:
    try:
        return httpx.get(root_url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
