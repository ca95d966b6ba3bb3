"""The linear algebra of rank that LoRA rests on, on torch tensors.

A matrix M (m × n) has the singular value decomposition M = U Σ Vᵀ, with U (m × k) and V (n × k)
orthonormal, k = min(m, n), and Σ = diag(σ₁ ≥ σ₂ ≥ … ≥ σ_k ≥ 0). Everything here reads off Σ:

- rank: how many σᵢ stand above round-off (numpy's rule), not how many are exactly non-zero.
- effective rank (Roy & Vetterli 2007): exp of the entropy of σ / Σσ, a smooth "how many directions matter".
- energy: the fraction of ‖M‖_F² = Σσᵢ² that the first k directions hold.
- approx / factors: by Eckart–Young, keeping the top r triplets is the best rank-r approximation, and its
  two factors B (m × r) and A (r × n) are exactly the shapes of a LoRA update ΔW = B A.
- pinv: the Moore–Penrose pseudo-inverse, V Σ⁺ Uᵀ.
- subspace_similarity / subspace_similarities: how much two adapters' top directions overlap (LoRA paper, section 7).
- factored_svd and friends: the same quantities for an update s·B·A given as its two factors, from r × r
  products only: with B = Q_B R_B and Aᵀ = Q_A R_A, s·B·A = (Q_B U) Σ (Q_A V)ᵀ where U Σ Vᵀ is the SVD of the
  r × r core s·R_B R_Aᵀ, so the out × in matrix is never formed.

A worked example: [[1, 2, 3], [2, 4, 6], [1, 3, 5]] has singular values 10.2330, 0.5353 and 0, so rank 2
(the second row is twice the first). Inputs may be float32 or float64 on any device; integer inputs are
promoted to float64 and half-precision ones computed in float32. Everything is exact by default; when only
the top r triplets of a large matrix are needed and an approximation will do, method="randomized" (or "auto")
uses the randomized SVD (Halko et al. 2011, torch.svd_lowrank).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

__all__ = [
    "approx",
    "approx_error",
    "effective_rank",
    "effective_rank_of_spectrum",
    "energy",
    "energy_kept",
    "energy_of_spectrum",
    "factored_svd",
    "factors",
    "frobenius_inner",
    "pinv",
    "rank",
    "rank_for_energy",
    "rank_for_energy_of_spectrum",
    "rank_of_spectrum",
    "relative_difference",
    "singular_values",
    "subspace_similarities",
    "subspace_similarity",
    "truncated_factors",
    "truncated_svd",
]

SVDMethod = Literal["auto", "exact", "randomized"]

# `truncated_svd(method="auto")` goes randomized only when it clearly pays: a big matrix and a small r.
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_RANK_FRACTION = 0.1
RANDOMIZED_OVERSAMPLE = 10


def as_matrix(M: torch.Tensor, name: str = "matrix") -> torch.Tensor:
    """Checks that M is a finite 2-D tensor and returns it in a dtype the SVD accepts."""
    if not isinstance(M, torch.Tensor):
        M = torch.as_tensor(M)
    if M.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got a tensor of shape {tuple(M.shape)}")
    if M.is_complex():
        raise ValueError(f"{name} must be real, got dtype {M.dtype}")
    if not M.is_floating_point():
        M = M.to(torch.float64)
    elif M.dtype in (torch.float16, torch.bfloat16):
        M = M.to(torch.float32)
    if M.numel() and not torch.isfinite(M).all():
        raise ValueError(f"{name} contains NaN or inf")
    return M


def _check_rank_arg(r: int, M: torch.Tensor) -> None:
    limit = min(M.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= limit:
        raise ValueError(f"rank r must be an integer in [0, {limit}] for a {tuple(M.shape)} matrix, got {r!r}")


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of M, descending.

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.

    Returns:
        A (min(m, n),) tensor in M's (promoted) dtype, on M's device.

    Raises:
        ValueError: M is not 2-D, is complex, or holds NaN or inf.
    """
    return torch.linalg.svdvals(as_matrix(M))


def default_tolerance(S: torch.Tensor, shape: tuple[int, ...]) -> float:
    """numpy's `matrix_rank` threshold: σ_max · max(m, n) · eps of S's dtype (the precision S was computed in)."""
    if S.numel() == 0:
        return 0.0
    return float(S.max()) * (max(shape) * torch.finfo(S.dtype).eps)  # in this order: σ_max · max(m, n) can overflow


def rank(M: torch.Tensor, tol: float | None = None) -> int:
    """Numerical rank: the number of singular values above `tol` (default: numpy's rule).

    numpy's rule: σ_max · max(m, n) · eps of the dtype the singular values are computed in.

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        tol: the absolute threshold (None: numpy's rule).

    Returns:
        The rank, an int in [0, min(m, n)].

    Raises:
        ValueError: M is not 2-D, is complex, or holds NaN or inf.
    """
    M = as_matrix(M)
    return rank_of_spectrum(torch.linalg.svdvals(M), tuple(M.shape), tol)


def effective_rank(M: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): exp(H(p)) with p = σ / Σσ.

    Between 1 and rank(M); 0 for the zero matrix.

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.

    Returns:
        The effective rank, a float.

    Raises:
        ValueError: M is not 2-D, is complex, or holds NaN or inf.
    """
    return effective_rank_of_spectrum(singular_values(M))


def energy(M: torch.Tensor) -> torch.Tensor:
    """e[k-1] = (σ₁² + … + σ_k²) / Σσᵢ²: non-decreasing, last element exactly 1.

    The zero matrix has no energy to share out; its curve is all ones (nothing is missing at any k).

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.

    Returns:
        The curve e, a (min(m, n),) tensor in M's (promoted) dtype.

    Raises:
        ValueError: M is not 2-D, is complex, or holds NaN or inf.
    """
    return energy_of_spectrum(singular_values(M))


def rank_for_energy(M: torch.Tensor, fraction: float) -> int:
    """The smallest k whose top-k directions hold at least `fraction` of the energy (0 for the zero matrix).

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        fraction: the share of ‖M‖_F² to hold, in (0, 1].

    Returns:
        k, an int in [1, min(m, n)]; 0 for the zero matrix.

    Raises:
        ValueError: `fraction` is outside (0, 1]; M is not 2-D, is complex, or holds NaN or inf.
    """
    return rank_for_energy_of_spectrum(singular_values(M), fraction)


# The same quantities from a spectrum already at hand (say, one computed from LoRA factors).


def rank_of_spectrum(S: torch.Tensor, shape: tuple[int, ...], tol: float | None = None) -> int:
    """How many of the singular values S of a matrix of `shape` stand above `tol` (default: numpy's rule).

    Args:
        S: the matrix's singular values, a 1-D tensor.
        shape: the matrix's shape (m, n), for the default threshold.
        tol: the absolute threshold (None: σ_max · max(m, n) · eps of S's dtype).

    Returns:
        The count, an int.
    """
    if tol is None:
        tol = default_tolerance(S, shape)
    return int((S > tol).sum())


def effective_rank_of_spectrum(S: torch.Tensor) -> float:
    """`effective_rank` from the singular values S: exp of the entropy of σᵢ / Σσ.

    Args:
        S: a matrix's singular values, a 1-D tensor of non-negative values.

    Returns:
        The effective rank, a float; 0.0 where S is empty or all zero.
    """
    if S.numel() == 0 or S.max() == 0:
        return 0.0
    S = S / S.max()  # scale-free, and Σσ of a matrix with entries near float max would overflow
    p = S / S.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def energy_of_spectrum(S: torch.Tensor) -> torch.Tensor:
    """`energy` from the singular values S (descending): the cumulative share of Σσ², one value per rank.

    Args:
        S: a matrix's singular values, a 1-D tensor, descending.

    Returns:
        A tensor shaped and typed like S, non-decreasing, last element exactly 1; all ones where S is all zero.
    """
    if S.numel() == 0 or S.max() == 0:
        return torch.ones_like(S)
    squares = (S / S.max()).square()  # scale-free, and σ² overflows from σ ≈ 1e154 (float64) on
    total = squares.sum()
    # round-off can push the partial sums a hair past 1 before the end: clamp, and make the last exact
    curve = (squares.cumsum(0) / total).clamp_(max=1.0)
    curve[-1] = 1.0
    return curve


def rank_for_energy_of_spectrum(S: torch.Tensor, fraction: float) -> int:
    """`rank_for_energy` from the singular values S: the smallest rank keeping `fraction` of Σσ².

    Args:
        S: a matrix's singular values, a 1-D tensor, descending.
        fraction: the share of Σσ² to keep, in (0, 1].

    Returns:
        The rank, an int in [1, len(S)]; 0 where S is empty or all zero.

    Raises:
        ValueError: `fraction` is outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    if S.numel() == 0 or S.max() == 0:
        return 0
    curve = energy_of_spectrum(S)
    return min(int((curve < fraction).sum()) + 1, curve.numel())


def truncated_svd(
    M: torch.Tensor, r: int, method: SVDMethod = "exact", niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top r singular triplets: U_r (m × r), S_r (r,), Vh_r (r × n).

    method="exact" (the default) runs the full thin SVD; "randomized" runs torch.svd_lowrank with `niter`
    subspace iterations and some oversampling, an approximation (seeded: the same on every run); "auto" picks
    randomized for large matrices and small r, exact otherwise.

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        r: how many triplets, an int in [0, min(m, n)].
        method: "exact", "randomized" or "auto" (randomized where min(m, n) ≥ 1024 and r ≤ min(m, n) / 10).
        niter: the randomized SVD's subspace iterations (more: closer to the exact triplets, slower).

    Returns:
        (U_r, S_r, Vh_r): U_r (m × r) with orthonormal columns, S_r (r,) descending, Vh_r (r × n) with
        orthonormal rows, in M's (promoted) dtype, on M's device.

    Raises:
        ValueError: r is not an int in [0, min(m, n)]; an unknown method; M is not 2-D, is complex, or holds
            NaN or inf.
    """
    M = as_matrix(M)
    _check_rank_arg(r, M)
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    small_side = min(M.shape)
    if method == "auto":
        big = small_side >= RANDOMIZED_MIN_DIM and r <= RANDOMIZED_MAX_RANK_FRACTION * small_side
        method = "randomized" if big else "exact"
    if method == "randomized" and r > 0:
        q = min(r + RANDOMIZED_OVERSAMPLE, small_side)
        with _seeded_generator(M.device):  # the same triplets on every run, the caller's random streams untouched
            U, S, V = torch.svd_lowrank(M, q=q, niter=niter)
        return U[:, :r], S[:r], V[:, :r].mT
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


@contextmanager
def _seeded_generator(device: torch.device) -> Iterator[None]:
    """Seeds, for the block, only the generator that draws on `device` (torch.svd_lowrank's Gaussian test
    matrix), and gives its state back afterwards. `torch.manual_seed` would also reseed every CUDA generator,
    which `fork_rng` for one device does not save."""
    on_cpu = device.type == "cpu"
    with torch.random.fork_rng([] if on_cpu else [device], device_type="cuda" if on_cpu else device.type):
        if on_cpu:
            torch.default_generator.manual_seed(0)
        else:
            backend = torch.get_device_module(device.type)
            if hasattr(backend, "device") and device.index is not None:
                with backend.device(device.index):
                    backend.manual_seed(0)  # the current device's generator alone
            else:
                backend.manual_seed(0)
        yield


def approx(M: torch.Tensor, r: int, method: SVDMethod = "exact") -> torch.Tensor:
    """The best rank-r approximation of M in Frobenius and spectral norm (Eckart–Young).

    Only close to it with method="randomized" or "auto" (see `truncated_svd`).

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        r: the rank, an int in [0, min(m, n)].
        method: "exact", "randomized" or "auto", as in `truncated_svd`.

    Returns:
        U_r Σ_r V_rᵀ, an m × n tensor in M's (promoted) dtype.

    Raises:
        ValueError: r is not an int in [0, min(m, n)]; an unknown method; M is not 2-D, is complex, or holds
            NaN or inf.
    """
    U, S, Vh = truncated_svd(M, r, method)
    return (U * S) @ Vh


def approx_error(M: torch.Tensor, r: int) -> float:
    """‖M − approx(M, r)‖_F = sqrt(σ_{r+1}² + … + σ_k²), the smallest error any rank-r matrix can have.

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        r: the rank, an int in [0, min(m, n)].

    Returns:
        The error, a float (from the exact singular values).

    Raises:
        ValueError: r is not an int in [0, min(m, n)]; M is not 2-D, is complex, or holds NaN or inf.
    """
    M = as_matrix(M)
    _check_rank_arg(r, M)
    return float(torch.linalg.vector_norm(torch.linalg.svdvals(M)[r:]))  # scaled inside: no overflow of σ²


def factors(
    M: torch.Tensor, r: int, split: Literal["sqrt", "left"] = "sqrt", method: SVDMethod = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-shaped factors (B, A), B (m × r) and A (r × n), with B @ A = approx(M, r, method).

    split="sqrt": B = U_r √Σ_r, A = √Σ_r V_rᵀ (balanced, as PiSSA uses them).
    split="left": B = U_r Σ_r, A = V_rᵀ (A has orthonormal rows).

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        r: the rank, an int in [0, min(m, n)].
        split: how Σ_r is shared between the factors, "sqrt" or "left".
        method: "exact", "randomized" or "auto", as in `truncated_svd`.

    Returns:
        (B, A): B (m × r) and A (r × n), in M's (promoted) dtype.

    Raises:
        ValueError: an unknown split (after the SVD has run); r is not an int in [0, min(m, n)]; an unknown
            method; M is not 2-D, is complex, or holds NaN or inf.
    """
    U, S, Vh = truncated_svd(M, r, method)
    if split == "sqrt":
        root = S.sqrt()
        return U * root, root[:, None] * Vh
    if split == "left":
        return U * S, Vh
    raise ValueError(f"split must be 'sqrt' or 'left', got {split!r}")


def pinv(M: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse V Σ⁺ Uᵀ (n × m).

    Singular values at or below rtol · σ_max count as zero; the default rtol, max(m, n) · eps, is the
    same threshold `rank` uses, so pinv inverts exactly the directions rank counts.

    Args:
        M: a real, finite 2-D tensor (m × n); integers are promoted to float64, half precision to float32.
        rtol: the threshold relative to σ_max (None: max(m, n) · eps of M's (promoted) dtype).

    Returns:
        The pseudo-inverse, an n × m tensor in M's (promoted) dtype.

    Raises:
        ValueError: M is not 2-D, is complex, or holds NaN or inf.
    """
    M = as_matrix(M)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if rtol is None:
        cutoff = default_tolerance(S, M.shape)
    else:
        cutoff = rtol * (float(S.max()) if S.numel() else 0.0)
    keep = S > cutoff
    S_inv = torch.where(keep, 1 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    return (Vh.mT * S_inv) @ U.mT


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) (Hu et al. 2021, section 7), in [0, 1].

    U_i holds the top-i right singular vectors of A1 (r1 × n), U_j the top-j of A2 (r2 × n): 1 when one
    subspace contains the other, 0 when they are orthogonal.

    Args:
        A1: one adapter's A factor (r1 × n), real and finite.
        A2: another's (r2 × n), with the same n.
        i: how many of A1's top right singular vectors, an int in [1, min(r1, n)].
        j: how many of A2's, an int in [1, min(r2, n)].

    Returns:
        φ, a float in [0, 1].

    Raises:
        ValueError: i or j out of range; A1 and A2 with different numbers of columns; either is not 2-D, is
            complex, or holds NaN or inf.
    """
    phi = subspace_similarities(A1, A2)
    for name, k, limit in (("i", i, phi.shape[0]), ("j", j, phi.shape[1])):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise ValueError(f"{name} must be an integer in [1, {limit}], got {k!r}")
    return float(phi[i - 1, j - 1])


def subspace_similarities(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Every φ(A1, A2, i, j) of `subspace_similarity` at once, as a k1 × k2 tensor (entry [i-1, j-1]).

    With k = min(A.shape): one SVD per matrix, since ‖U_iᵀ U_j‖_F² is a prefix sum of the squared entries of
    V1ᵀ V2 (all right singular vectors of both).

    Args:
        A1: one adapter's A factor (r1 × n), real and finite.
        A2: another's (r2 × n), with the same n.

    Returns:
        φ, a k1 × k2 tensor (k1 = min(r1, n), k2 = min(r2, n)) of values in [0, 1], in the two inputs'
        promoted dtype.

    Raises:
        ValueError: A1 and A2 with different numbers of columns; either is not 2-D, is complex, or holds NaN or
            inf.
    """
    A1, A2 = as_matrix(A1, "A1"), as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 need the same number of columns, got {tuple(A1.shape)} and {tuple(A2.shape)}")
    dtype = torch.promote_types(A1.dtype, A2.dtype)
    V1 = torch.linalg.svd(A1.to(dtype), full_matrices=False).Vh  # (k1 × n)
    V2 = torch.linalg.svd(A2.to(dtype), full_matrices=False).Vh  # (k2 × n)
    overlap = (V1 @ V2.mT).square().cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U_iᵀ U_j‖_F²
    i = torch.arange(1, V1.shape[0] + 1, dtype=dtype, device=V1.device)
    j = torch.arange(1, V2.shape[0] + 1, dtype=dtype, device=V2.device)
    return (overlap / torch.minimum(i[:, None], j[None, :])).clamp(0.0, 1.0)


# -- updates given as factors, ΔW = s · B A ---------------------------------------------------------


def factored_svd(
    B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, name: str = "scale · B A"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of scale · B A from B (out × r) and A (r × in), never forming out × in.

    S holds min(out, in, r) singular values, U is out × that and Vh that × in: r may exceed out or in.

    Args:
        B: the left factor (out × r).
        A: the right factor (r × in).
        scale: s, multiplying the product (it may be negative).
        name: what the product is, for the error message.

    Returns:
        (U, S, Vh) in float64, on the factors' device: U (out × k), S (k,) descending, Vh (k × in), with
        k = min(out, in, r) and U diag(S) Vh = scale · B A.

    Raises:
        ValueError: factors with NaN or inf, or a product past float64's range (a huge scale): the SVD would
            fail to converge, or give infinite singular values.
        RuntimeError: B's columns and A's rows differ.
    """
    B, A = B.double(), A.double()
    Q_B, R_B = torch.linalg.qr(B)  # (out × k), (k × r), k = min(out, r)
    Q_A, R_A = torch.linalg.qr(A.mT)  # (in × k'), (k' × r), k' = min(in, r)
    core = scale * R_B @ R_A.mT  # k × k', with the singular values of scale · B A
    if not torch.isfinite(core).all():
        scaled = f" (scale {scale:g})" if scale != 1 else ""
        raise ValueError(f"{name} holds NaN or inf, or is beyond float64's range{scaled}")
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)  # the thin SVD of the k × k' core
    return Q_B @ U, S, Vh @ Q_A.mT


def truncated_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank k, √Σ on each side, at scale 1.

    Args:
        U: left singular vectors (m × ≥k), as `factored_svd` or `truncated_svd` return them.
        S: the singular values, descending.
        Vh: right singular vectors (≥k × n).
        k: the rank to keep; beyond len(S), all of them are kept.

    Returns:
        (A, B) (note the order, the reverse of `factors`): A = √Σ_k Vh_k (k × n) and B = U_k √Σ_k (m × k), so
        that B @ A is the rank-k truncation.
    """
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


def frobenius_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = trace((B₁ᵀB₂)(A₂A₁ᵀ)) from r × r products only.

    Args:
        B1: the first update's left factor (m × r1).
        A1: its right factor (r1 × n).
        B2: the second update's left factor (m × r2).
        A2: its right factor (r2 × n).

    Returns:
        The inner product, a float computed in float64.

    Raises:
        RuntimeError: the factors' shapes do not fit together (raised by torch).
    """
    return float(((B1.double().mT @ B2.double()) * (A1.double() @ A2.double().mT)).sum())


def energy_kept(S: torch.Tensor, k: int) -> float:
    """The fraction of ‖ΔW‖²_F that the top k of its singular values S hold (all of it for k ≥ len(S)).

    Args:
        S: ΔW's singular values, a non-empty 1-D tensor, descending.
        k: how many, 0 or more.

    Returns:
        The fraction, a float in [0, 1] (0.0 for k = 0; 1.0 for k ≥ 1 where S is all zero).
    """
    if k <= 0:
        return 0.0
    curve = energy_of_spectrum(S.double())
    return float(curve[min(k, curve.numel()) - 1])


def relative_difference(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """‖B₁A₁ − B₂A₂‖_F / ‖B₂A₂‖_F, from r × r products only.

    Args:
        B1: the first update's left factor (m × r1).
        A1: its right factor (r1 × n).
        B2: the reference update's left factor (m × r2).
        A2: its right factor (r2 × n).

    Returns:
        The relative difference, a float; the absolute one, ‖B₁A₁‖_F, where B₂A₂ = 0.

    Raises:
        RuntimeError: the factors' shapes do not fit together (raised by torch).
    """
    d2 = frobenius_inner(B1, A1, B1, A1) - 2 * frobenius_inner(B1, A1, B2, A2) + frobenius_inner(B2, A2, B2, A2)
    reference = frobenius_inner(B2, A2, B2, A2)
    return math.sqrt(max(d2, 0.0) / reference) if reference > 0 else math.sqrt(max(d2, 0.0))
