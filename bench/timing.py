"""Interleaved timing: every candidate runs once per round, in a rotating order, after warm-up, so that
drift in the machine's speed hits all of them alike. Medians, ratios of medians, and a bootstrap interval
for each ratio, so that a reader can tell a difference from the machine's noise.

Calls much shorter than `min_sample` are repeated back to back within a sample (the same count for every
candidate), as timeit's autorange does, so that a 10 ms forward pass is not measured at the timer's noise."""

from __future__ import annotations

import math
import random
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
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one sample per round."""
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
    return samples


def ratio_interval(
    numerator: list[float], denominator: list[float], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap interval of median(numerator) / median(denominator). Whole rounds are resampled, so the two
    candidates of a round, which ran side by side under the same state of the machine, stay together."""
    rng = random.Random(0)
    rounds = range(len(numerator))
    ratios = []
    for _ in range(resamples):
        picked = rng.choices(rounds, k=len(numerator))
        top = statistics.median([numerator[i] for i in picked])
        ratios.append(top / statistics.median([denominator[i] for i in picked]))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[int((1 - tail) * resamples) - 1]


def summary(samples: dict[str, list[float]], ratios: dict[str, tuple[str, str]]) -> dict:
    """Medians of every candidate; each named ratio (numerator, denominator) of medians with its interval."""
    return {
        "seconds": {name: statistics.median(times) for name, times in samples.items()},
        "ratios": {
            name: statistics.median(samples[a]) / statistics.median(samples[b]) for name, (a, b) in ratios.items()
        },
        "intervals": {name: ratio_interval(samples[a], samples[b]) for name, (a, b) in ratios.items()},
    }
