"""Looking inside stored adapters: each layer's spectrum and rank (`inspect`), and how two adapters'
updates overlap (`compare`, the LoRA paper's section 7), from the factors alone."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from lorakit import lowrank
from lorakit.engine.peft_format import config_from_peft
from lorakit.tools.stored import AdapterState, LayerFactors, as_state, check_same_shapes

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
    """Per layer: r, α, scale, the singular values of ΔW (from the factors), numerical and effective rank,
    and the energy curve.

    The numerical rank counts the singular values that stand above both the float64 round-off of computing
    them (numpy's rule) and what storing the factors in their dtype may have added (`rounding_tolerance`).
    """
    state = as_state(adapter)
    config = config_from_peft(state.config)
    for layer in state.layers():
        _, S, _ = lowrank.factored_svd(layer.B, layer.A, layer.scale)  # in float64, whatever the factors' dtype
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
    """Per layer the two adapters share: the subspace similarity φ(i, j) of their A matrices for every
    i ≤ r₁, j ≤ r₂ (LoRA paper, section 7) and the cosine similarity of the two ΔW."""
    one = {layer.path: layer for layer in as_state(first).layers()}
    two = {layer.path: layer for layer in as_state(second).layers()}
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
