"""The start-up timing choices of the CPU path, cached per CPU and recorded for GetWorkerInfo.

The worker times candidate kernels against each other at start-up (cpu/linear.py: cpu/linear.c or
F.linear at few float32 rows, oneDNN or F.linear for bfloat16; quant_linear.py: the int8/int4 op or
float32). Each answer is kept in a JSON file under the key of the CPU it was timed on (model name,
flags, cores, torch version and threads: `signature`), so a restart on the same machine reads the
same choices back instead of timing again, and is not re-decided by the noise of a busy machine.
The file is `$PAGEDSERVE_KERNEL_CHOICES`, else `kernel-choices.json` in the cache directory of the
compiled kernels (cpu/native.py: `$PAGEDSERVE_CACHE_DIR`, else ~/.cache/pagedserve); the value
`off` turns caching off (every start times afresh; the test suite does this, so each test times).
Delete the file, or the CPU's entry, to time again.

Every choice, timed or read back, is also recorded on the model (`record`), for the log and for
`WorkerInfo.kernel_choices`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pagedserve.worker.cpu import features, native

log = logging.getLogger(__name__)

ENV = "PAGEDSERVE_KERNEL_CHOICES"
FILE_NAME = "kernel-choices.json"


def cache_path() -> Path | None:
    """Where the choices are kept; None when $PAGEDSERVE_KERNEL_CHOICES is `off`."""
    value = os.environ.get(ENV)
    if value == "off":
        return None
    return Path(value) if value else native.cache_dir() / FILE_NAME


def signature() -> dict:
    """What a timing depends on: the CPU (model name, flags, cores this process may use), torch's
    version and the threads it runs with."""
    return {"cpu": features.cpu_model_name(), "flags": " ".join(sorted(features.cpu_flags())),
            "cores": features.cores(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def signature_key(sig: dict) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or a damaged file: time again
        return {}


def _write(path: Path, data: dict) -> None:
    """Written under a temporary name and renamed, so a worker never reads half a file (workers
    starting together: the last one's file wins, the others' choices are timed again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: the choice holds for this process only
        log.warning("kernel choices not cached in %s (%s)", path, e)


def cached(key: str, allowed: tuple[str, ...], choose: Callable[[], str]) -> tuple[str, bool]:
    """This CPU's cached answer for `key` (e.g. "bfloat16 linear 960x576"), else `choose()`'s,
    which is then cached; a cached answer not in `allowed` (a file from another version) is timed
    again. Returns (the answer, whether it came from the cache)."""
    path = cache_path()
    if path is None:
        return choose(), False
    sig = signature()
    entry_key = signature_key(sig)
    entry = _read(path).get(entry_key, {})
    if entry.get("choices", {}).get(key) in allowed:
        return entry["choices"][key], True
    answer = choose()
    data = _read(path)  # again: another worker may have written meanwhile
    entry = data.setdefault(entry_key, {"signature": sig, "choices": {}})
    entry.setdefault("choices", {})[key] = answer
    _write(path, data)
    return answer, False


def decide(model: nn.Module, key: str, names: dict[str, str], choose: Callable[[], str]) -> str:
    """`cached` over the choices `names` (choice -> how the log names it), recorded on the model
    as "<key>: <name> (timed|cached)"; returns the choice."""
    choice, hit = cached(key, tuple(names), choose)
    record(model, f"{key}: {names[choice]} ({'cached' if hit else 'timed'})")
    return choice


def record(model: nn.Module, text: str) -> None:
    """Note a choice on the model (`model.kernel_choices`, a list of strings): the worker logs
    them and reports them in WorkerInfo.kernel_choices."""
    choices = model.__dict__.setdefault("kernel_choices", [])
    choices.append(text)


def recorded(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("kernel_choices", []))
