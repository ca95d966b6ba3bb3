"""lorakit.lowrank against numpy, on random matrices of many shapes and both dtypes, and the notes' examples; and
the algebra of updates given as factors (ΔW = s · B A) without forming ΔW."""

import numpy as np
import pytest
import torch
from helpers import random_factors
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit as lk
from lorakit import lowrank

DTYPES = [torch.float32, torch.float64]
# float32 round-off against numpy's float64 answer, scaled by the matrix's size
RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def random_matrix(m: int, n: int, k: int | None, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """An m × n matrix of exact rank k (full rank when k is None)."""
    g = torch.Generator().manual_seed(seed)
    if k is None:
        M = torch.randn(m, n, generator=g, dtype=torch.float64)
    else:
        M = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
    return M.to(dtype)


shapes = st.sampled_from([(1, 1), (5, 5), (12, 4), (4, 12), (30, 17), (17, 30), (40, 40)])


matrices = st.builds(
    lambda shape, deficient, dtype, seed: random_matrix(
        *shape, max(1, min(shape) // 2) if deficient else None, dtype, seed
    ),
    shapes,
    st.booleans(),
    st.sampled_from(DTYPES),
    st.integers(0, 10_000),
)


def numpy_of(M: torch.Tensor) -> np.ndarray:
    return M.double().numpy()


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_singular_values_match_numpy_and_descend(M):
    S = lowrank.singular_values(M)
    expected = np.linalg.svd(numpy_of(M), compute_uv=False)
    scale = expected.max()
    np.testing.assert_allclose(S.double().numpy(), expected, rtol=0, atol=RTOL[M.dtype] * scale * max(M.shape))
    assert S.dtype == M.dtype
    assert torch.all(S[:-1] >= S[1:])


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_rank_matches_numpy_matrix_rank(M):
    # numpy in the same dtype, so both apply the same eps to the same round-off
    assert lowrank.rank(M) == np.linalg.matrix_rank(M.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_of_planted_low_rank_matrices(dtype):
    for m, n, k in [(20, 30, 1), (30, 20, 7), (25, 25, 24), (64, 16, 16)]:
        assert lowrank.rank(random_matrix(m, n, k, dtype, seed=k)) == k


def test_rank_respects_explicit_tolerance():
    M = torch.diag(torch.tensor([10.0, 1.0, 1e-3], dtype=torch.float64))
    assert lowrank.rank(M) == 3
    assert lowrank.rank(M, tol=1e-2) == 2
    assert lowrank.rank(M, tol=5.0) == 1


def test_rank_measures_of_a_matrix_near_float_max_do_not_overflow():
    M = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 1e-3]], dtype=torch.float64)
    huge = M * 1e308 / 2  # σ_max ≈ 7e307: finite, but σ_max · 3, Σσ and σ² are not
    assert lowrank.rank(huge) == lowrank.rank(M) == np.linalg.matrix_rank(huge.numpy()) == 3
    assert lowrank.effective_rank(huge) == pytest.approx(lowrank.effective_rank(M))
    torch.testing.assert_close(lowrank.energy(huge), lowrank.energy(M))
    assert lowrank.rank_for_energy(huge, 0.99) == lowrank.rank_for_energy(M, 0.99) == 2
    assert lowrank.approx_error(huge, 2) == pytest.approx(lowrank.approx_error(M, 2) * 1e308 / 2)


@settings(max_examples=40, deadline=None)
@given(matrices)
def test_effective_rank_is_exp_entropy_of_normalised_singular_values(M):
    s = np.linalg.svd(numpy_of(M), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    expected = float(np.exp(-(p * np.log(p)).sum()))
    assert lowrank.effective_rank(M) == pytest.approx(expected, rel=1e-3)
    assert 1 - 1e-6 <= lowrank.effective_rank(M) <= min(M.shape) + 1e-6


def test_effective_rank_of_identity_and_rank_one():
    assert lowrank.effective_rank(torch.eye(7, dtype=torch.float64)) == pytest.approx(7.0)
    assert lowrank.effective_rank(torch.ones(5, 3)) == pytest.approx(1.0, abs=1e-5)
    assert lowrank.effective_rank(torch.zeros(4, 4)) == 0.0


@settings(max_examples=40, deadline=None)
@given(matrices)
def test_energy_is_cumulative_share_of_squared_singular_values(M):
    s2 = np.linalg.svd(numpy_of(M), compute_uv=False) ** 2
    expected = np.cumsum(s2) / s2.sum()
    curve = lowrank.energy(M)
    np.testing.assert_allclose(curve.double().numpy(), expected, rtol=RTOL[M.dtype] * 10, atol=RTOL[M.dtype])
    assert torch.all(curve[1:] >= curve[:-1])
    assert curve[-1].item() == 1.0


@settings(max_examples=40, deadline=None)
@given(matrices, st.floats(0.01, 1.0))
def test_rank_for_energy_is_smallest_k_reaching_the_fraction(M, fraction):
    k = lowrank.rank_for_energy(M, fraction)
    curve = lowrank.energy(M)
    assert 1 <= k <= min(M.shape)
    assert curve[k - 1] >= fraction or k == min(M.shape)
    if k > 1:
        assert curve[k - 2] < fraction


def test_rank_for_energy_finds_planted_rank_and_refuses_bad_fractions():
    M = random_matrix(40, 30, 6, torch.float64, seed=3)
    assert lowrank.rank_for_energy(M, 1.0 - 1e-9) == 6
    assert lowrank.rank_for_energy(torch.zeros(3, 3), 0.5) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="energy fraction"):
            lowrank.rank_for_energy(M, bad)


def numpy_approx(M: np.ndarray, r: int) -> np.ndarray:
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


@settings(max_examples=60, deadline=None)
@given(matrices, st.integers(0, 40))
def test_approx_and_its_error_match_numpy_eckart_young(M, r):
    r = min(r, min(M.shape))
    expected = numpy_approx(numpy_of(M), r)
    scale = max(1.0, float(np.abs(numpy_of(M)).max())) * max(M.shape)
    np.testing.assert_allclose(lowrank.approx(M, r).double().numpy(), expected, atol=RTOL[M.dtype] * scale)
    true_error = np.linalg.norm(numpy_of(M) - expected)
    assert lowrank.approx_error(M, r) == pytest.approx(true_error, rel=1e-3, abs=RTOL[M.dtype] * scale)


@settings(max_examples=60, deadline=None)
@given(matrices, st.integers(1, 40), st.sampled_from(["sqrt", "left"]))
def test_factors_have_lora_shapes_and_multiply_to_the_best_approximation(M, r, split):
    r = min(r, min(M.shape))
    B, A = lowrank.factors(M, r, split=split)
    m, n = M.shape
    assert B.shape == (m, r) and A.shape == (r, n)
    scale = max(1.0, float(M.abs().max())) * max(M.shape)
    np.testing.assert_allclose((B @ A).double().numpy(), numpy_approx(numpy_of(M), r), atol=RTOL[M.dtype] * scale)
    if split == "left":  # A = V_rᵀ has orthonormal rows
        torch.testing.assert_close(A @ A.mT, torch.eye(r, dtype=M.dtype), atol=RTOL[M.dtype] * 10, rtol=0)
    else:  # sqrt split balances the two factors
        torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), atol=RTOL[M.dtype] * scale, rtol=1e-3)


def test_rank_argument_is_checked():
    M = torch.randn(4, 6)
    for bad in (-1, 5, 2.0, True):
        with pytest.raises(ValueError, match="rank r must be an integer"):
            lowrank.approx(M, bad)
    with pytest.raises(ValueError, match="split"):
        lowrank.factors(M, 2, split="middle")


@pytest.mark.parametrize("shape", [(8, 8), (20, 6), (6, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pinv_matches_numpy_on_full_rank_matrices(shape, dtype):
    M = random_matrix(*shape, None, dtype, seed=sum(shape))
    np.testing.assert_allclose(
        lowrank.pinv(M).double().numpy(), np.linalg.pinv(numpy_of(M)), rtol=RTOL[dtype] * 10, atol=RTOL[dtype]
    )


@pytest.mark.parametrize("m,n,k", [(10, 10, 3), (30, 12, 5), (12, 30, 1)])
def test_pinv_of_rank_deficient_matrix_matches_numpy_and_penrose_conditions(m, n, k):
    M = random_matrix(m, n, k, torch.float64, seed=m * n)
    P = lowrank.pinv(M)
    rcond = max(m, n) * np.finfo(np.float64).eps
    np.testing.assert_allclose(P.numpy(), np.linalg.pinv(M.numpy(), rcond=rcond), atol=1e-9)
    torch.testing.assert_close(M @ P @ M, M)
    torch.testing.assert_close(P @ M @ P, P)
    torch.testing.assert_close((M @ P).mT, M @ P)
    torch.testing.assert_close((P @ M).mT, P @ M)


def test_subspace_similarity_is_one_for_same_subspace_and_zero_for_orthogonal():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 50, generator=g, dtype=torch.float64)
    mixed = torch.randn(4, 4, generator=g, dtype=torch.float64) @ A  # same row space, other basis
    assert lowrank.subspace_similarity(A, mixed, 4, 4) == pytest.approx(1.0)
    Q = torch.linalg.qr(torch.randn(50, 8, generator=g, dtype=torch.float64)).Q.mT  # 8 orthonormal rows
    assert lowrank.subspace_similarity(Q[:4], Q[4:], 4, 4) == pytest.approx(0.0, abs=1e-12)
    # the top direction of a rank-8 A lies inside its own top-4 subspace
    assert lowrank.subspace_similarity(Q, Q, 1, 4) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 1000))
def test_subspace_similarity_matches_numpy_formula(r1, r2, seed):
    g = torch.Generator().manual_seed(seed)
    A1 = torch.randn(r1, 32, generator=g, dtype=torch.float64)
    A2 = torch.randn(r2, 32, generator=g, dtype=torch.float64)
    i, j = max(1, r1 // 2), r2
    V1 = np.linalg.svd(A1.numpy())[2][:i]
    V2 = np.linalg.svd(A2.numpy())[2][:j]
    expected = np.linalg.norm(V1 @ V2.T) ** 2 / min(i, j)
    assert lowrank.subspace_similarity(A1, A2, i, j) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 <= expected <= 1.0 + 1e-12


def test_subspace_similarities_holds_every_pairwise_phi_of_the_numpy_formula():
    g = torch.Generator().manual_seed(4)
    A1 = torch.randn(5, 20, generator=g, dtype=torch.float64)
    A2 = torch.randn(3, 20, generator=g, dtype=torch.float64)
    V1, V2 = np.linalg.svd(A1.numpy())[2], np.linalg.svd(A2.numpy())[2]
    expected = [[np.linalg.norm(V1[:i] @ V2[:j].T) ** 2 / min(i, j) for j in range(1, 4)] for i in range(1, 6)]
    phi = lowrank.subspace_similarities(A1, A2)
    np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert lowrank.subspace_similarity(A1, A2, 4, 2) == phi[3, 1]


def test_subspace_similarity_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same number of columns"):
        lowrank.subspace_similarity(torch.randn(2, 5), torch.randn(2, 6), 1, 1)
    with pytest.raises(ValueError, match="i must be"):
        lowrank.subspace_similarity(torch.randn(2, 5), torch.randn(2, 5), 3, 1)


def test_randomized_truncated_svd_matches_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    m, n, r = 1500, 1200, 16
    U = torch.linalg.qr(torch.randn(m, 60, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 60, generator=g, dtype=torch.float64)).Q
    s = 100.0 * 0.8 ** torch.arange(60, dtype=torch.float64)
    M = (U * s) @ V.mT + 1e-6 * torch.randn(m, n, generator=g, dtype=torch.float64)
    exact = lowrank.truncated_svd(M, r, method="exact")
    randomized = lowrank.truncated_svd(M, r, method="randomized")
    torch.testing.assert_close(randomized[1], exact[1], rtol=1e-6, atol=0)
    best = lowrank.approx_error(M, r)
    randomized_error = float(torch.linalg.matrix_norm(M - lowrank.approx(M, r, method="randomized")))
    assert randomized_error <= best * (1 + 1e-6)
    # "auto" takes the randomized path here and gives the same answer
    auto = lowrank.approx(M, r, method="auto")
    torch.testing.assert_close(auto, lowrank.approx(M, r, method="exact"), atol=1e-8, rtol=0)


def test_approx_and_factors_are_exact_by_default_on_large_matrices():
    """A flat spectrum at the size where "auto" would go randomized: the default still gives the Eckart–Young
    optimum, numpy's truncated SVD, with exactly the error approx_error promises."""
    g = torch.Generator().manual_seed(2)
    M, r = torch.randn(1024, 1024, generator=g, dtype=torch.float64), 8
    U, s, Vt = np.linalg.svd(M.numpy())
    best = (U[:, :r] * s[:r]) @ Vt[:r]
    found = lowrank.approx(M, r)
    np.testing.assert_allclose(found.numpy(), best, atol=1e-9, rtol=0)
    assert float(torch.linalg.matrix_norm(M - found)) == pytest.approx(lowrank.approx_error(M, r), rel=1e-12)
    B, A = lowrank.factors(M, r)
    np.testing.assert_allclose((B @ A).numpy(), best, atol=1e-9, rtol=0)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="must be 2-D"):
        lowrank.rank(torch.randn(3))
    with pytest.raises(ValueError, match="must be 2-D"):
        lowrank.rank(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        lowrank.rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    # integers are promoted, half precision is computed in float32
    assert lowrank.rank([[1, 0, 0], [0, 1, 0], [1, 1, 0]]) == 2
    assert lowrank.singular_values(torch.eye(3, dtype=torch.bfloat16)).dtype == torch.float32


def test_notes_example_dependent_row_gives_rank_two():
    assert lowrank.rank(torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]])) == 2


def test_notes_example_singular_values_are_the_true_ones_not_the_rough_figures():
    M = torch.tensor([[1.0, 2, 3], [2, 4, 6], [1, 3, 5]], dtype=torch.float64)
    S = lowrank.singular_values(M)
    torch.testing.assert_close(S, torch.tensor([10.2330, 0.5353, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    assert lowrank.rank(M) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_notes_example_rank_two_product_and_its_factors_reproduce_the_layer(dtype):
    torch.manual_seed(0)
    W = (torch.randn(10, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)).to(dtype)
    assert lowrank.rank(W) == 2
    B, A = lowrank.factors(W, 2)
    x, b = torch.randn(10, dtype=dtype), torch.randn(10, dtype=dtype)
    torch.testing.assert_close(B @ (A @ x) + b, W @ x + b, atol=RTOL[dtype] * 100, rtol=RTOL[dtype] * 10)


def test_randomized_truncated_svd_is_reproducible_and_leaves_the_global_random_stream_alone():
    M = torch.randn(300, 200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = lowrank.truncated_svd(M, 5, method="randomized")
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is where it was
    second = lowrank.truncated_svd(M, 5, method="randomized")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# -- updates given as factors --------------------------------------------------------------------------------------


def test_factored_svd_of_a_rank_above_the_layer_is_thin_and_matches_numpy():
    A, B = random_factors(8, 40, 16, seed=5, dtype=torch.float64)  # r = 16 > out = 8
    U, S, Vh = lk.lowrank.factored_svd(B, A, 0.5)
    assert (U.shape, S.shape, Vh.shape) == ((8, 8), (8,), (8, 40))
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(0.5 * B.numpy() @ A.numpy(), compute_uv=False), rtol=1e-12)
    torch.testing.assert_close((U * S) @ Vh, 0.5 * B @ A, atol=1e-12, rtol=0)


def test_truncated_factors_multiply_to_the_best_rank_k_approximation_with_balanced_sides():
    M = torch.randn(12, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    A, B = lowrank.truncated_factors(U, S, Vh, 3)
    assert A.shape == (3, 9) and B.shape == (12, 3)
    torch.testing.assert_close(B @ A, lowrank.approx(M, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), atol=1e-12, rtol=0)  # √Σ on each side


def test_frobenius_inner_of_factored_updates_equals_that_of_the_full_products():
    A1, B1 = random_factors(30, 20, 4, seed=1, dtype=torch.float64)
    A2, B2 = random_factors(30, 20, 6, seed=2, dtype=torch.float64)
    expected = float(((B1 @ A1) * (B2 @ A2)).sum())
    assert lowrank.frobenius_inner(B1, A1, B2, A2) == pytest.approx(expected, rel=1e-12)
    assert lowrank.frobenius_inner(B1, A1, B1, A1) == pytest.approx(float(torch.linalg.matrix_norm(B1 @ A1)) ** 2)


def test_relative_difference_of_factored_updates_matches_the_full_matrices():
    A1, B1 = random_factors(30, 20, 4, seed=1, dtype=torch.float64)
    A2, B2 = random_factors(30, 20, 6, seed=2, dtype=torch.float64)
    expected = float(torch.linalg.matrix_norm(B1 @ A1 - B2 @ A2) / torch.linalg.matrix_norm(B2 @ A2))
    assert lowrank.relative_difference(B1, A1, B2, A2) == pytest.approx(expected, rel=1e-9)
    # the same product from other factors, B G and G⁻¹ A: no difference
    G = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 4 * torch.eye(4)
    assert lowrank.relative_difference(B1 @ G, torch.linalg.solve(G, A1), B1, A1) == pytest.approx(0.0, abs=1e-6)
    # against a zero update, the difference is the absolute norm
    zero = lowrank.relative_difference(B1, A1, torch.zeros_like(B1), A1)
    assert zero == pytest.approx(float(torch.linalg.matrix_norm(B1 @ A1)), rel=1e-9)


def test_energy_kept_is_the_share_of_squared_singular_values_in_the_top_k():
    S = torch.tensor([3.0, 2.0, 1.0])
    assert lowrank.energy_kept(S, 1) == pytest.approx(9 / 14)
    assert lowrank.energy_kept(S, 2) == pytest.approx(13 / 14)
    assert lowrank.energy_kept(S, 3) == 1.0
    assert lowrank.energy_kept(S, 10) == 1.0  # past the spectrum: all of it


def test_randomized_svd_seeds_only_the_generator_it_draws_from(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    M = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    calls.clear()
    state = torch.random.get_rng_state()
    first = lowrank.truncated_svd(M, 3, method="randomized")
    assert calls == []  # a CPU matrix leaves every CUDA generator alone (torch.manual_seed reseeds them all)
    assert torch.equal(torch.random.get_rng_state(), state)  # and the caller's CPU stream too
    second = lowrank.truncated_svd(M, 3, method="randomized")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # seeded: the same triplets on every call


def test_energy_kept_by_no_direction_is_zero():
    assert lowrank.energy_kept(torch.tensor([3.0, 2.0, 1.0]), 0) == 0.0
