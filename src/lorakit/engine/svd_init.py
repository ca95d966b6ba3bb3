"""Adapters that start from the weight they adapt: PiSSA, MiLoRA and OLoRA.

For a weight W (out × in) and scale s, each picks factors B (out × r), A (r × in) from W itself and
leaves the frozen base as the residual W_res = W − s·B·A, so the model's outputs are unchanged at the start:

- "pissa" (Meng et al. 2024): the top-r singular triplets, B = U_r √Σ_r / √s, A = √Σ_r V_rᵀ / √s; training
  starts in the principal directions. "pissa_niter_K" gets them from the randomized SVD with K subspace
  iterations (fast on large layers).
- "milora": the r smallest singular triplets instead, leaving the principal directions to the base.
- "olora" (Büyükakyüz 2024): the QR decomposition, B = Q[:, :r], A = R[:r] (so W_res = W − s·Q_r R_r).

Because the base weight changed, a plain LoRA file for the untouched original needs the update relative
to W, not to W_res: s·B·A − s·B₀·A₀ = s·[B | −B₀] [A ; A₀], a LoRA of rank 2r (`to_plain_lora`), which is
what `lk.save_adapter(..., convert_to_lora=True)` writes.
"""

from __future__ import annotations

import torch

from lorakit import lowrank
from lorakit.engine.config import PISSA_NITER
from lorakit.engine.layers import LoraLayer, LoraLinear

__all__ = ["check_svd_init", "initialise_from_weight", "to_plain_lora"]


def check_svd_init(layer: LoraLayer, path: str, init: str, r: int, scale: float) -> None:
    """Refuses a layer that `init` cannot start an adapter of rank r and scale s from."""
    if not isinstance(layer, LoraLinear):
        raise ValueError(f"init={init!r} works on Linear and Conv1D layers; {path} is not one")
    if not layer.base.weight.is_floating_point():
        raise ValueError(f"init={init!r} rewrites the weight, and {path}'s is quantized ({layer.base.weight.dtype})")
    shape = (layer.out_features, layer.in_features)
    if r > min(shape):
        raise ValueError(f"init={init!r} needs r <= min{shape} ({path}), got r={r}")
    if scale == 0:
        raise ValueError(f"init={init!r} needs a non-zero alpha ({path})")


def initialise_from_weight(layer: LoraLayer, adapter: str, init: str) -> None:
    """Sets `adapter`'s A and B from the layer's weight and makes the base weight the residual.

    The layer must have passed `check_svd_init` under its module path (as `inject` checks every layer before
    it rewrites the first), so that a refusal names the layer.
    """
    r, s = layer.rank(adapter), layer.scale[adapter]
    base = layer.base.weight
    W = (base.T if layer.fan_in_fan_out else base).detach()  # (out × in)
    if W.dtype != torch.float64:
        W = W.float()  # the decompositions want at least float32
    if init == "olora":
        Q, R = torch.linalg.qr(W)  # W (out × in) = Q (out × k) R (k × in); as PEFT and the paper, unscaled
        B, A = Q[:, :r], R[:r]
    else:
        if init == "milora":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, -r:], S[-r:], Vh[-r:]
        else:
            niter = PISSA_NITER.fullmatch(init)
            method = "randomized" if niter else "exact"
            U, S, Vh = lowrank.truncated_svd(W, r, method=method, niter=int(niter.group(1)) if niter else 4)
        root = (S / abs(s)).sqrt()
        B, A = U * root, root[:, None] * Vh
        if s < 0:
            B = -B
    with torch.no_grad():
        layer.lora_A[adapter].copy_(A)
        layer.lora_B[adapter].copy_(B)
        layer.base.weight -= layer.delta_weight(adapter).to(base.dtype)
    layer.remember_initial_factors(adapter)


def to_plain_lora(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Factors of rank 2r whose update, at the same scale, is s·B·A − s·B₀·A₀: A' (2r × in), B' (out × 2r)."""
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)
