"""Top-level names that belong to other packages, kept theirs in the test processes.

The repository's root is on sys.path in every test process (pytest puts it there so that `tests`
imports; `python -m` puts the working directory there), and from the root the room folders
`kernels/`, `router/`, `scheduler/`, `worker/` would pass for top-level packages of those names.
Ours are `pagedserve.kernels` and so on; a package installed under one of those names (Hugging
Face's `kernels`, which transformers imports as soon as it is installed) must win. The served
processes never have the root on sys.path (the launcher starts them with `python -P`); the test
processes get this finder from tests/__init__.py, the multiprocessing children of the
tensor-parallel tests included, since they import `tests` before their target.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOM_FOLDERS = frozenset({"kernels", "router", "scheduler", "worker"})


def is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


class ForeignNames(importlib.abc.MetaPathFinder):
    """Finds a room folder's name on sys.path without the repository's root; where nothing else
    provides it, leaves it to the finders after it (today's behaviour: the root's folder)."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in ROOM_FOLDERS:
            return None
        return importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if not is_root(p)])


def install() -> None:
    """Puts the finder first on sys.meta_path, once per process."""
    if not any(isinstance(finder, ForeignNames) for finder in sys.meta_path):
        sys.meta_path.insert(0, ForeignNames())
