"""New adapters from stored ones, from the factors alone: `resize` to a lower rank, `combine` several.

    small = lk.resize("adapter-dir", r=4)                        # the optimal rank-4 version
    mix = lk.combine(["a", "b"], [0.7, 0.3], method="svd", r=8)  # one adapter from two

Truncating the factored SVD (lowrank.factored_svd) gives the best lower-rank adapter (Eckart–Young), and
stacking factors ([B₁ | B₂], [A₁ ; A₂]) adds updates exactly. The tensors beside the factors (a classifier's
modules_to_save copy, trained biases) and the labels go along: as they are in `resize`, added up in `combine`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from lorakit import lowrank
from lorakit.engine.config import check_positive_int
from lorakit.io.labels import LABELS_NAME
from lorakit.tools import COMBINE_METHODS, CombineMethod
from lorakit.tools.stored import (
    AdapterState,
    as_state,
    check_rank_or_energy,
    check_same_base,
    check_same_shapes,
    chosen_rank,
    extra_kind,
    state_from_layers,
)

__all__ = ["combine", "resize"]


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
        The resized adapter, every layer at scale 1 (α = r), its factors in their old dtypes, and the tensors
        besides the factors (modules_to_save copies, biases) and the labels as they were. Its report gives each
        layer's rank before and after, relative Frobenius error and energy kept.

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
        U, S, Vh = lowrank.factored_svd(layer.B, layer.A, layer.scale, f"the update of layer {layer.path}")
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
    result = state_from_layers(layers, factors, state.config, state.extras())
    result.report, result.labels = report, state.labels
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

    The tensors besides the factors (`AdapterState.extras`: a classifier's modules_to_save copy, trained biases)
    combine as Σ wᵢ Tᵢ, where every adapter holds the same ones (an average where the weights sum to 1); base
    weights that PEFT saves beside an adapted embedding must be equal, and are kept. The labels must be equal.

    Args:
        adapters: two or more adapter directories or AdapterStates; a layer must have the same shape in every
            adapter that has it.
        weights: wᵢ, one finite number per adapter (None: all 1).
        method: "svd", "cat" or "linear", as above.
        r: the rank of every layer, for "svd" only (None: the largest rank among the adapters that have the
            layer); capped at min(out, in, sum of the ranks), what the sum can have.

    Returns:
        The combined adapter, every layer at scale 1 (α = r). Its report holds the method, the weights, under
        "layers" each layer's rank and relative error, and under "extras" how many tensors besides the factors
        were added up ("summed") and kept ("kept"), and the sum of the weights.

    Raises:
        ValueError: fewer than two adapters; not one weight per adapter; a weight that is NaN or inf; an unknown
            method; `r` with a method other than "svd", or not a positive integer; a layer with different shapes
            in two adapters; "linear" on a layer whose ranks differ; adapters that hold different tensors besides
            the factors, or different labels, task types, modules_to_save, biases or base models; an adapter
            directory or AdapterState that `AdapterState.load` or `AdapterState.layers` refuses.
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
    check_same_base(states)
    extras, extras_report = combined_extras(states, weights)
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
            U, S, Vh = lowrank.factored_svd(B_cat, A_cat, name=f"the weighted sum of layer {path}")
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
    result = state_from_layers(out_layers, factors, states[0].config, extras)
    result.report, result.labels = {**report, "extras": extras_report}, states[0].labels
    return result


def combined_extras(states: list[AdapterState], weights: list[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors besides the factors of the combined adapter, and what was done: Σ wᵢ Tᵢ for each copy or bias,
    base weights kept where all are equal. Refuses adapters that differ in what those tensors are or mean."""
    first = states[0]
    for name, value in (
        ("labels", lambda s: s.labels),
        ("task_type", lambda s: s.config.get("task_type")),
        ("modules_to_save", lambda s: s.config.get("modules_to_save")),
        ("bias", lambda s: s.config.get("bias", "none")),
    ):
        for k, state in enumerate(states[1:], start=2):
            if value(state) != value(first):
                what = f"labels ({LABELS_NAME})" if name == "labels" else name
                raise ValueError(
                    f"adapters 1 and {k} have different {what}, {value(first)!r} and {value(state)!r}: combining "
                    "them would mix what their outputs mean"
                )
    held = [state.extras() for state in states]
    for k, tensors in enumerate(held[1:], start=2):
        different = sorted(held[0].keys() ^ tensors.keys())
        if different:
            raise ValueError(
                f"adapters 1 and {k} hold different tensors besides their LoRA factors (e.g. {different[0]!r}): "
                "combine adds such tensors up only where every adapter holds the same ones"
            )
        for key, t in tensors.items():
            if t.shape != held[0][key].shape:
                raise ValueError(
                    f"{key} has different shapes in adapters 1 and {k}: {tuple(held[0][key].shape)}, {tuple(t.shape)}"
                )
    combined, kept = {}, 0
    for key, t in held[0].items():
        if extra_kind(key, first.config) == "base weight":  # the base itself, not a trained copy: one of it
            if any(not torch.equal(tensors[key], t) for tensors in held[1:]):
                raise ValueError(f"{key}, a base weight saved beside the factors, differs between the adapters")
            combined[key], kept = t, kept + 1
        else:
            combined[key] = sum(w * tensors[key].double() for w, tensors in zip(weights, held, strict=True)).to(t.dtype)
    return combined, {"summed": len(combined) - kept, "kept": kept, "weight_sum": sum(weights)}
