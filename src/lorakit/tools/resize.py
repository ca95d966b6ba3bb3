"""New adapters from stored ones, from the factors alone: `resize` to a lower rank, `combine` several.

    small = lk.resize("adapter-dir", r=4)                        # the optimal rank-4 version
    mix = lk.combine(["a", "b"], [0.7, 0.3], method="svd", r=8)  # one adapter from two

Truncating the factored SVD (lowrank.factored_svd) gives the best lower-rank adapter (Eckart–Young), and
stacking factors ([B₁ | B₂], [A₁ ; A₂]) adds updates exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from lorakit import lowrank
from lorakit.engine.config import check_positive_int
from lorakit.tools.stored import (
    AdapterState,
    as_state,
    check_rank_or_energy,
    check_same_shapes,
    chosen_rank,
    state_from_layers,
)

__all__ = ["COMBINE_METHODS", "combine", "resize"]

CombineMethod = Literal["svd", "cat", "linear"]
COMBINE_METHODS = get_args(CombineMethod)


def resize(
    adapter: str | os.PathLike | AdapterState, r: int | None = None, energy: float | None = None
) -> AdapterState:
    """The best adapter of rank r (or of the rank holding `energy` of each layer's ‖ΔW‖²_F), per layer.

    From the factors alone (`lowrank.factored_svd`). Ranks above what a layer's ΔW can have,
    min(out, in, current rank), are refused (they add nothing).

    Args:
        adapter: an adapter directory or an AdapterState.
        r: the new rank of every layer. Exactly one of `r` and `energy`.
        energy: the fraction of each layer's ‖ΔW‖²_F to keep, in (0, 1]; each layer gets the smallest rank
            that holds it, at least 1.

    Returns:
        The resized adapter, every layer at scale 1 (α = r), its factors in their old dtypes. Its report gives
        each layer's rank before and after, relative Frobenius error and energy kept.

    Raises:
        ValueError: both or neither of `r` and `energy`, or a bad value of either; `r` above a layer's
            min(out, in, current rank); an adapter directory or AdapterState that `AdapterState.load` or
            `AdapterState.layers` refuses.
        FileNotFoundError: no adapter directory, or one without its files.
    """
    check_rank_or_energy(r, energy)
    state = as_state(adapter)
    layers = state.layers()
    factors, report = {}, {"layers": {}}
    for layer in layers:
        U, S, Vh = lowrank.factored_svd(layer.B, layer.A, layer.scale)
        where = f"layer {layer.path} ({layer.B.shape[0]} × {layer.A.shape[1]}, rank {layer.rank})"
        k = chosen_rank(S, S.numel(), r, energy, where)
        A, B = lowrank.truncated_factors(U, S, Vh, k)
        factors[layer.path] = (A.to(layer.A.dtype), B.to(layer.B.dtype))
        kept = lowrank.energy_kept(S, k)
        report["layers"][layer.path] = {
            "rank_before": layer.rank,
            "rank": k,
            "relative_error": math.sqrt(max(0.0, 1 - kept)),
            "energy_kept": kept,
        }
    result = state_from_layers(layers, factors, state.config)
    result.report = report
    return result


def combine(
    adapters: Sequence[str | os.PathLike | AdapterState],
    weights: Sequence[float] | None = None,
    method: CombineMethod = "svd",
    r: int | None = None,
) -> AdapterState:
    """One adapter for Σ wᵢ ΔWᵢ, per layer (a layer missing from an adapter counts as ΔW = 0 there).

    "cat": exact, stacking [w₁s₁B₁ | w₂s₂B₂ | …] and [A₁ ; A₂ ; …] (rank = sum of ranks);
    "svd": the best rank-r fit of the sum (default r: the largest input rank), through `factored_svd`;
    "linear": Σ √|wᵢsᵢ| Aᵢ and Σ ±√|wᵢsᵢ| Bᵢ, for equal ranks: cheap, but its cross terms make it inexact.
    The report gives each layer's relative Frobenius error against the exact sum.

    Args:
        adapters: two or more adapter directories or AdapterStates; a layer must have the same shape in every
            adapter that has it.
        weights: wᵢ, one finite number per adapter (None: all 1).
        method: "svd", "cat" or "linear", as above.
        r: the rank of every layer, for "svd" only (None: the largest rank among the adapters that have the
            layer); capped at min(out, in, sum of the ranks), what the sum can have.

    Returns:
        The combined adapter, every layer at scale 1 (α = r). Its report holds the method, the weights and,
        under "layers", each layer's rank and relative error.

    Raises:
        ValueError: fewer than two adapters; not one weight per adapter; a weight that is NaN or inf; an unknown
            method; `r` with a method other than "svd", or not a positive integer; a layer with different shapes
            in two adapters; "linear" on a layer whose ranks differ; an adapter directory or AdapterState that
            `AdapterState.load` or `AdapterState.layers` refuses.
        FileNotFoundError: no adapter directory, or one without its files.
    """
    if len(adapters) < 2:
        raise ValueError("combine needs at least two adapters")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if method not in COMBINE_METHODS:
        raise ValueError(f"method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if r is not None:
        if method != "svd":
            raise ValueError(f"a rank only applies to method 'svd', not {method!r}")
        check_positive_int("rank", r)
    states = [as_state(a) for a in adapters]
    per_adapter = [{layer.path: layer for layer in s.layers()} for s in states]
    paths = list(dict.fromkeys(path for layers in per_adapter for path in layers))
    out_layers, factors, report = [], {}, {"method": method, "weights": weights, "layers": {}}
    for path in paths:
        present = [(w, layers[path]) for w, layers in zip(weights, per_adapter, strict=True) if path in layers]
        check_same_shapes(path, [layer for _, layer in present])
        # the exact sum as stacked factors, each term at scale w·s
        A_cat = torch.cat([layer.A.double() for _, layer in present])
        B_cat = torch.cat([w * layer.scale * layer.B.double() for w, layer in present], dim=1)
        if method == "cat":
            A, B, error = A_cat, B_cat, 0.0
        elif method == "svd":
            U, S, Vh = lowrank.factored_svd(B_cat, A_cat)
            k = min(r or max(layer.rank for _, layer in present), S.numel())
            A, B = lowrank.truncated_factors(U, S, Vh, k)
            error = math.sqrt(max(0.0, 1 - lowrank.energy_kept(S, k)))
        else:
            ranks = {layer.rank for _, layer in present}
            if len(ranks) != 1:
                raise ValueError(f"method 'linear' needs equal ranks; layer {path} has ranks {sorted(ranks)}")
            A = sum(math.sqrt(abs(w * layer.scale)) * layer.A.double() for w, layer in present)
            B = sum(
                math.copysign(math.sqrt(abs(w * layer.scale)), w * layer.scale) * layer.B.double()
                for w, layer in present
            )
            error = lowrank.relative_difference(B, A, B_cat, A_cat)
        first = present[0][1]
        out_layers.append(first)
        factors[path] = (A.to(first.A.dtype), B.to(first.B.dtype))
        report["layers"][path] = {"rank": A.shape[0], "relative_error": error}
    result = state_from_layers(out_layers, factors, states[0].config)
    result.report = report
    return result
