"""What truncating the weights costs: the model's own metric when each targeted W is replaced by its best rank-k
approximation (Eckart–Young: the top k singular triplets), k set per matrix either as a fraction of its full rank
or as the smallest k that keeps a given share of its energy Σσ².

The notes claim that "parameters can be gotten rid of without decreasing performance", as if pre-trained weights
were rank-deficient. They are not (every W of the demo's MLP and of all-MiniLM-L6-v2 is numerically full-rank); this
measures what dropping their weak directions actually does to the task. Each level also reports what the factored
form would store, Σ k (m + n) against Σ m n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from rich.console import Console
from torch import nn

from lorakit import lowrank
from lorakit.io.console import make_console, make_progress

__all__ = ["ENERGIES", "FRACTIONS", "truncation_sweep"]

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # of each matrix's full rank min(m, n)
ENERGIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # of each matrix's Σσ²


def truncation_sweep(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    paths: Sequence[str],
    fractions: Sequence[float] = FRACTIONS,
    energies: Sequence[float] = ENERGIES,
    console: Console | None = None,
) -> dict[str, list[dict]]:
    """The metric of `model` with the weight of each module in `paths` cut to rank k, at every level.

    The weights are restored afterwards, bit for bit, also when `evaluate` fails.

    Args:
        model: the model (its weights are written during the sweep).
        evaluate: its metric on held-out data.
        paths: the modules whose 2-D `.weight` is truncated (Linear layers, say).
        fractions: levels as a fraction of each matrix's full rank (k = ⌈fraction · min(m, n)⌉).
        energies: levels as the share of each matrix's energy kept (k = the fewest singular values holding it).
        console: where the progress over the levels goes (None: stderr).

    Returns:
        {"fraction": [...], "energy": [...]}, one row per level: {"level", "metric", "rank_kept" (Σk / Σ min(m, n)),
        "energy_kept" (Σ over matrices of the energy kept / their total energy), "stored" (Σ k (m + n) / Σ m n)}.

    Raises:
        ValueError: a module without a 2-D weight.
    """
    weights = {}
    for path in paths:
        weight = getattr(model.get_submodule(path), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{path} has no 2-D weight to truncate")
        weights[path] = weight
    svds = {path: torch.linalg.svd(W.detach().double(), full_matrices=False) for path, W in weights.items()}
    originals = {path: W.detach().clone() for path, W in weights.items()}
    full_rank = sum(min(W.shape) for W in weights.values())
    total_energy = sum(float(S.square().sum()) for _, S, _ in svds.values())
    dense = sum(W.numel() for W in weights.values())

    progress = make_progress(console or make_console(stderr=True))
    bar = progress.add_task("truncated weights, evaluated", total=len(fractions) + len(energies))

    def measure(level: float, ranks: dict[str, int]) -> dict:
        with torch.no_grad():
            for path, W in weights.items():
                A, B = lowrank.truncated_factors(*svds[path], ranks[path])  # B @ A: the rank-k truncation
                W.copy_(B @ A)
        row = {
            "level": level,
            "metric": evaluate(model),
            "rank_kept": sum(ranks.values()) / full_rank,
            "energy_kept": sum(float(svds[p][1][: ranks[p]].square().sum()) for p in weights) / total_energy,
            "stored": sum(ranks[p] * sum(W.shape) for p, W in weights.items()) / dense,
        }
        progress.advance(bar)
        return row

    try:
        with progress:
            by_fraction = [
                measure(f, {p: max(1, math.ceil(f * min(W.shape))) for p, W in weights.items()}) for f in fractions
            ]
            by_energy = [
                measure(e, {p: lowrank.rank_for_energy_of_spectrum(svds[p][1], e) for p in weights}) for e in energies
            ]
    finally:
        with torch.no_grad():
            for path, W in weights.items():
                W.copy_(originals[path])
    return {"fraction": by_fraction, "energy": by_energy}
