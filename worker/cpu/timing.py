"""The one way the CPU path times candidate kernels against each other at start-up: every
candidate called in turn, `repeats` rounds, the median of each (interleaved, so that a shared
machine's load hits every candidate alike; the median, so that one preempted call decides nothing).
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def median_seconds(candidates: dict[str, Callable[[], object]], repeats: int = 15) -> dict[str, float]:
    """Each candidate's median wall time in seconds over `repeats` interleaved calls."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def fastest(candidates: dict[str, Callable[[], object]], repeats: int = 15) -> str:
    """The name of the candidate with the smallest median time (the first on a tie)."""
    medians = median_seconds(candidates, repeats)
    return min(medians, key=medians.get)
