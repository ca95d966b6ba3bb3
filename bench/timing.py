"""Interleaved timing: every candidate runs once per round, in a rotating order, after warm-up, so that
drift in the machine's speed hits all of them alike. Medians, the median of each pair's ratio round by
round, and a bootstrap interval for it, so that a reader can tell a difference from the machine's noise.

A case runs in several fresh processes (as pyperf does): two processes of the same code can disagree by
more than the rounds within either one (where the allocator and the OS placed things), so samples are kept
per process, `samples[name][process][round]`, and the interval resamples processes as well as rounds.

Calls much shorter than `min_sample` are repeated back to back within a sample (the same count for every
candidate), as timeit's autorange does, so that a 10 ms forward pass is not measured at the timer's noise."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch

Samples = dict[str, list[list[float]]]  # candidate -> process -> seconds per call, one per round


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
    """Seconds per call of each candidate in this process, one sample per round."""
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


def round_ratios(numerator: list[list[float]], denominator: list[list[float]]) -> list[list[float]]:
    """Each round's numerator / denominator, per process. The two ran side by side in their round, so a round's
    ratio is free of the machine's drift between rounds and between processes, which a ratio of medians pooled
    over processes running at different speeds would not be."""
    return [
        [a / b for a, b in zip(top, bottom, strict=True)] for top, bottom in zip(numerator, denominator, strict=True)
    ]


def paired_ratio(numerator: list[list[float]], denominator: list[list[float]]) -> float:
    """The median of the round ratios (`round_ratios`) over the rounds of all processes."""
    return statistics.median(r for process in round_ratios(numerator, denominator) for r in process)


def ratio_interval(
    numerator: list[list[float]], denominator: list[list[float]], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap interval of `paired_ratio`. Each resample draws processes with replacement, then rounds with
    replacement within each drawn process (a round's ratio keeps its two candidates together)."""
    rng = random.Random(0)
    per_process = round_ratios(numerator, denominator)
    ratios = []
    for _ in range(resamples):
        drawn = [
            r for process in rng.choices(per_process, k=len(per_process)) for r in rng.choices(process, k=len(process))
        ]
        ratios.append(statistics.median(drawn))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[int((1 - tail) * resamples) - 1]


def summary(samples: Samples, ratios: dict[str, tuple[str, str]]) -> dict:
    """Every candidate's median over all rounds; each named ratio (numerator, denominator) as `paired_ratio`,
    with its interval and its value in each process on its own; and the samples themselves."""
    return {
        "seconds": {name: statistics.median(t for p in times for t in p) for name, times in samples.items()},
        "ratios": {name: paired_ratio(samples[a], samples[b]) for name, (a, b) in ratios.items()},
        "intervals": {name: ratio_interval(samples[a], samples[b]) for name, (a, b) in ratios.items()},
        "per_process": {
            name: [paired_ratio([ta], [tb]) for ta, tb in zip(samples[a], samples[b], strict=True)]
            for name, (a, b) in ratios.items()
        },
        "samples": samples,
    }
