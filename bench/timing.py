"""Interleaved timing: every candidate runs once per round, in a rotating order, after warm-up, so that
drift in the machine's speed hits all of them alike. Medians, and ratios of medians.

Calls much shorter than `min_sample` are repeated back to back within a sample (the same count for every
candidate), as timeit's autorange does, so that a 10 ms forward pass is not measured at the timer's noise."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], number: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize()
    return (time.perf_counter() - start) / number


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, min_sample: float = 0.05
) -> dict[str, float]:
    """Median seconds per call of each candidate."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    fastest = min(timed(candidates[name], 1) for name in names)
    number = max(1, math.ceil(min_sample / fastest))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            samples[name].append(timed(candidates[name], number))
    return {name: statistics.median(times) for name, times in samples.items()}
