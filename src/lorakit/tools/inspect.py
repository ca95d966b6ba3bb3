"""Looking inside stored adapters: each layer's spectrum and rank (`inspect`), and how two adapters'
updates overlap (`compare`, the LoRA paper's section 7), from the factors alone. The tensors beside the factors
(a classifier's modules_to_save copy, trained biases) are no update of a weight: `AdapterState.extras` lists them,
and neither function looks at them."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from lorakit import lowrank
from lorakit.engine.peft_format import config_from_peft
from lorakit.tools.stored import AdapterState, LayerFactors, as_state, check_same_base, check_same_shapes

__all__ = ["compare", "inspect", "rounding_tolerance"]


def rounding_tolerance(layer: LayerFactors) -> float:
    """How far rounding B and A to their stored dtype can have moved any singular value of ΔW = s·B·A:
    |s| · eps · (‖B‖_F ‖A‖₂ + ‖B‖₂ ‖A‖_F), eps of that dtype (a bound, by Weyl, with a factor 2 to spare).

    numpy's rule with that eps, σ_max · max(out, in) · eps, passes σ_max for bfloat16 once a side reaches 128
    (every adapter would have rank 0); this grows with the factors' norms, not with the layer's size.
    """
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in (layer.A, layer.B))
    A, B = layer.A.double(), layer.B.double()
    norm = torch.linalg.matrix_norm  # Frobenius by default, spectral with ord=2
    return abs(layer.scale) * eps * float(norm(B) * norm(A, 2) + norm(B, 2) * norm(A))


def inspect(adapter: str | os.PathLike | AdapterState) -> Iterator[dict[str, Any]]:
    """Per layer: r, α, scale, the singular values of ΔW (from the factors), ranks and the energy curve.

    The numerical rank counts the singular values that stand above both the float64 round-off of computing
    them (numpy's rule) and what storing the factors in their dtype may have added (`rounding_tolerance`).
    A generator: the adapter is read, and errors are raised, once iteration starts.

    Args:
        adapter: an adapter directory or an AdapterState.

    Yields:
        One dict per layer, in file order: "layer" (its path), "shape" ([out, in]), "r", "alpha", "scale",
        "singular_values" (the min(out, in, r) singular values of ΔW = s·B·A, descending), "rank" (numerical),
        "effective_rank" and "energy" (the cumulative share of ‖ΔW‖²_F, one value per singular value).

    Raises:
        ValueError: an adapter directory or AdapterState that `AdapterState.load` or `AdapterState.layers`
            refuses.
        FileNotFoundError: no adapter directory, or one without its files.
    """
    state = as_state(adapter)
    config = config_from_peft(state.config)
    for layer in state.layers():
        # in float64, whatever the factors' dtype
        _, S, _ = lowrank.factored_svd(layer.B, layer.A, layer.scale, f"the update of layer {layer.path}")
        shape = (layer.B.shape[0], layer.A.shape[1])
        tol = max(lowrank.default_tolerance(S, shape), rounding_tolerance(layer))
        yield {
            "layer": layer.path,
            "shape": list(shape),
            "r": layer.rank,
            "alpha": config.alpha_for(layer.path),
            "scale": layer.scale,
            "singular_values": S.tolist(),
            "rank": lowrank.rank_of_spectrum(S, shape, tol),
            "effective_rank": lowrank.effective_rank_of_spectrum(S),
            "energy": lowrank.energy_of_spectrum(S).tolist(),
        }


def compare(
    first: str | os.PathLike | AdapterState, second: str | os.PathLike | AdapterState
) -> Iterator[dict[str, Any]]:
    """Per layer the two adapters share: the subspace similarity of their A matrices and the cosine of their ΔW.

    φ(i, j) is computed for every i ≤ r₁, j ≤ r₂ (LoRA paper, section 7). A generator: the adapters are read,
    and errors are raised, once iteration starts.

    Args:
        first: an adapter directory or an AdapterState.
        second: another.

    Yields:
        One dict per shared layer, in `first`'s file order: "layer", "r1", "r2", "phi" (phi[i-1][j-1] = φ(i, j),
        i up to min(r₁, in), j up to min(r₂, in)) and "cosine" (⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F ‖ΔW₂‖_F), 0.0 where
        either update is zero).

    Raises:
        ValueError: the adapters are for different base models, or share no layer; a shared layer's shapes
            differ; an adapter directory or AdapterState that `AdapterState.load` or `AdapterState.layers` refuses.
        FileNotFoundError: no adapter directory, or one without its files.
    """
    states = [as_state(first), as_state(second)]
    check_same_base(states)
    one, two = ({layer.path: layer for layer in state.layers()} for state in states)
    common = [path for path in one if path in two]
    if not common:
        raise ValueError("the two adapters share no layer")
    for path in common:
        a, b = one[path], two[path]
        check_same_shapes(path, [a, b])
        phi = lowrank.subspace_similarities(a.A, b.A).tolist()  # one SVD per adapter gives every φ(i, j)
        inner = lowrank.frobenius_inner(a.scale * a.B, a.A, b.scale * b.B, b.A)
        norms = math.sqrt(lowrank.frobenius_inner(a.scale * a.B, a.A, a.scale * a.B, a.A)) * math.sqrt(
            lowrank.frobenius_inner(b.scale * b.B, b.A, b.scale * b.B, b.A)
        )
        yield {"layer": path, "r1": a.rank, "r2": b.rank, "phi": phi, "cosine": inner / norms if norms else 0.0}
