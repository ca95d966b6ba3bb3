"""Random projections from a small space into a model's parameters: θ_d (d,) ↦ P θ_d (D,), with d ≪ D.

The reference is the dense Gaussian projection (Li et al. 2018): P (D × d) with Gaussian entries and each
column scaled to unit length. Its columns are unit vectors in random directions, nearly orthogonal to each other
(their cosines are of order 1/√D). It takes D·d numbers: 91 GB for MiniLM's 22.7 M parameters and d = 1000.

The Fastfood transform (Le, Sarlós & Smola 2013), which Li et al. and Aghajanyan et al. (2020) use for large
models, has the same two properties from O(D) numbers in O(D log D) time:

    P θ_d = (H G Π H B [θ_d; 0])[:D] / (‖G‖ √D)

θ_d is padded with zeros to L = 2^⌈log₂ D⌉; B is a diagonal of random signs, H the L × L Walsh–Hadamard matrix
(entries ±1, never stored: `fwht` applies it as a product of small dense factors), Π a random permutation and G a
diagonal of Gaussians. Every column of H G Π H B has norm ‖G‖ √L exactly; keeping D of its L rows keeps D / L of that in
expectation, hence the division by ‖G‖ √D. The columns of two such matrices with d < d' from the same seed are
the first d of the same L: the subspaces of one seed are nested.

Both projections are torch modules whose forward takes (..., d) and returns (..., D); Fastfood's backward is its
transpose Pᵀ, applied the same way, so training θ_d never stores anything of size D × d either. With the same
seed, the projection for d is the first d columns of the one for any d' > d: the subspaces of a sweep are nested.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = ["DENSE_MAX_ENTRIES", "PROJECTIONS", "DenseProjection", "FastfoodProjection", "fwht"]

PROJECTIONS = ("fastfood", "dense")  # the kinds lorakit.study.intrinsic builds
DENSE_MAX_ENTRIES = 10**8  # 400 MB of float32: past this a dense P is refused (Fastfood does the same job)
BLOCK = 2**20  # rows of one Fastfood block: longer projections stack independent blocks
FACTOR_MAX = 128  # the largest dense Hadamard factor `fwht` multiplies by


@functools.cache
def _hadamard(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sylvester's H_m (m × m, entries ±1), m a power of two: H_1 = [1], H_2k = [[H_k, H_k], [H_k, −H_k]]."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _factors(n: int) -> list[int]:
    """n = 2^k as a product of as few powers of two of at most FACTOR_MAX as can be, their sizes as even as can be."""
    k, most = n.bit_length() - 1, FACTOR_MAX.bit_length() - 1  # n = 2^k, factors up to 2^most
    parts = max(1, -(-k // most))
    base, extra = divmod(k, parts)
    return [1 << (base + (i < extra)) for i in range(parts)]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """H x along the last dimension: the unnormalised Walsh–Hadamard transform.

    H is Sylvester's Hadamard matrix, H₁ = [1], H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]] (scipy.linalg.hadamard(n)): symmetric,
    H H = n I. Since H_{ab} = H_a ⊗ H_b, x viewed as an array (n₁, n₂, n₃) with n = n₁ n₂ n₃ is transformed by one
    small dense H_{nᵢ} (nᵢ ≤ 128) along each axis in turn: three matrix products for n = 2²⁰, O(n · Σ nᵢ)
    multiply-adds, vectorised as butterflies on short spans are not, and no memory beyond two vectors of n.

    Args:
        x: a floating-point tensor (..., n), n a power of two.

    Returns:
        H x, a new tensor of x's shape.

    Raises:
        ValueError: n is not a power of two.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a length that is a power of two, got {n}")
    y = x.reshape(-1, n)
    left = 1  # the product of the axes before the one transformed
    for m in _factors(n):
        h = _hadamard(m, x.dtype, x.device)
        right = n // (left * m)
        y = y.view(-1, m) @ h if right == 1 else torch.matmul(h, y.view(-1, left, m, right))  # H symmetric
        left *= m
    return y.reshape(x.shape)


class _Fastfood(torch.autograd.Function):
    """y = P x and, backwards, Pᵀ g: nothing of the forward pass is kept but the projection's own buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, projection: FastfoodProjection) -> torch.Tensor:
        ctx.projection, ctx.d = projection, x.shape[-1]
        return projection.apply_to(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.projection.apply_transpose_to(grad, ctx.d), None


class FastfoodProjection(nn.Module):
    """P θ_d: Fastfood blocks H G Π H B [θ_d; 0] of L rows each, stacked and cut to D rows (see the module).

    L is the power of two ≥ D, or BLOCK (2^20) where D is larger: then ⌈D / L⌉ independent blocks are stacked (as
    Le et al. do for outputs longer than one block), each transformed in cache rather than one transform of up
    to 2D numbers streaming through memory. Block b is scaled by 1 / (‖G_b‖ √D), which gives every column unit
    norm in expectation (exactly, for D a power of two up to BLOCK). 13 bytes per row of the stacked blocks.

    One instance serves every d up to min(D, L): θ_d of length d uses the first d columns of the same blocks,
    so the subspaces of one instance are nested, and a sweep over d draws B, Π and G once.

    Args:
        D: the dimension projected into (the number of trained parameters), a positive integer.
        seed: seeds B, Π and G; the same seed gives the same P.

    Raises:
        ValueError: D is not a positive integer.
    """

    def __init__(self, D: int, seed: int = 0):
        super().__init__()
        _check_dims(D, 1)
        self.D = D
        self.L = min(1 << (D - 1).bit_length(), BLOCK)  # rows per block, a power of two
        self.blocks = -(-D // self.L)
        rows = self.blocks * self.L
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.blocks, self.L), generator=generator, dtype=torch.int8).mul_(2).sub_(1)
        # Π of every block as one permutation of the stacked rows that keeps each block's rows within it:
        # (Πv)_k = v_permutation[k]
        offsets = torch.arange(0, rows, self.L, dtype=torch.int32)[:, None]
        within = [torch.randperm(self.L, generator=generator, dtype=torch.int32) for _ in range(self.blocks)]
        permutation = (torch.stack(within) + offsets).flatten()
        inverse = torch.empty_like(permutation).scatter_(  # Πᵀ = Π⁻¹: inverse[permutation[k]] = k
            0, permutation.long(), torch.arange(rows, dtype=torch.int32)
        )
        gaussians = torch.randn(self.blocks, self.L, generator=generator)  # G of each block
        norms = torch.linalg.vector_norm(gaussians.double(), dim=1, keepdim=True)
        # the buffers follow .to(device) but are not saved: the seed gives them back
        self.register_buffer("signs", signs, persistent=False)  # (blocks, L)
        self.register_buffer("permutation", permutation, persistent=False)  # (blocks · L,)
        self.register_buffer("inverse", inverse, persistent=False)  # (blocks · L,)
        self.register_buffer("gaussians", gaussians, persistent=False)  # (blocks, L)
        self.register_buffer("scales", (1.0 / (norms * math.sqrt(D))).float(), persistent=False)  # (blocks, 1)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """P θ: (..., d) → (..., D) for any d in [1, min(D, L)], differentiable (backwards it applies Pᵀ)."""
        d = theta.shape[-1]
        _check_dims(self.D, d)
        if d > self.L:
            raise ValueError(f"d = {d} exceeds this projection's {self.L} columns")
        return _Fastfood.apply(theta, self)

    def apply_to(self, x: torch.Tensor) -> torch.Tensor:
        """P x for x (..., d), without autograd."""
        d = x.shape[-1]
        v = x.new_zeros(*x.shape[:-1], self.blocks, self.L)  # (..., blocks, L): B [x; 0], in every block
        torch.mul(x.unsqueeze(-2), self.signs[:, :d], out=v[..., :d])  # B touches only the d entries of x
        v = fwht(v)  # H B
        v = v.flatten(-2).index_select(-1, self.permutation).unflatten(-1, (self.blocks, self.L))  # Π
        v = fwht(v.mul_(self.gaussians)).mul_(self.scales)  # H G, scaled
        return v.flatten(-2)[..., : self.D]  # (..., D)

    def apply_transpose_to(self, g: torch.Tensor, d: int) -> torch.Tensor:
        """Pᵀ g for g (..., D): Σ over blocks of the first d entries of B H Πᵀ G H [g; 0], scaled (H is symmetric)."""
        v = g.new_zeros(*g.shape[:-1], self.blocks * self.L)
        v[..., : self.D] = g
        v = v.unflatten(-1, (self.blocks, self.L)).mul_(self.scales)  # (..., blocks, L)
        v = fwht(v).mul_(self.gaussians)  # G H
        v = v.flatten(-2).index_select(-1, self.inverse).unflatten(-1, (self.blocks, self.L))  # Πᵀ
        v = fwht(v)  # H
        return (v[..., :d] * self.signs[:, :d]).sum(-2)  # (..., d)

    def extra_repr(self) -> str:
        return f"D={self.D}, blocks={self.blocks}, L={self.L}"


class DenseProjection(nn.Module):
    """The reference: P (D × d) with N(0, 1) entries, each column scaled to unit length (Li et al. 2018).

    Args:
        D: the dimension projected into, a positive integer.
        d: the dimension projected from, an integer in [1, D]; D·d at most DENSE_MAX_ENTRIES.
        seed: seeds P; for d < d' the first d columns are those of d''s P.

    Raises:
        ValueError: D or d out of range, or a P of more than DENSE_MAX_ENTRIES numbers (use Fastfood).
    """

    def __init__(self, D: int, d: int, seed: int = 0):
        super().__init__()
        _check_dims(D, d)
        if D * d > DENSE_MAX_ENTRIES:
            raise ValueError(
                f"a dense projection of {D:,} × {d:,} would hold {D * d:,} numbers (at most {DENSE_MAX_ENTRIES:,}): "
                "use the fastfood projection"
            )
        self.D, self.d = D, d
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(d, D, generator=generator).T  # column j drawn as one run: nested in d
        self.register_buffer("matrix", matrix / torch.linalg.vector_norm(matrix, dim=0), persistent=False)  # (D, d)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """P θ: (..., d) → (..., D)."""
        return theta @ self.matrix.T

    def extra_repr(self) -> str:
        return f"D={self.D}, d={self.d}"


def _check_dims(D: int, d: int) -> None:
    for name, value in (("D", D), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if d > D:
        raise ValueError(f"d = {d} exceeds the {D} parameters it would project into")
