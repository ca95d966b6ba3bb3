"""`lk.inspect` and `lk.compare` (lorakit.tools.inspect) agree with the full matrices: spectra, ranks above
half-precision round-off, effective ranks, subspace similarities and cosines."""

import numpy as np
import pytest
import torch
from helpers import adapter, deficient_adapter, full, random_factors, small_adapter

import lorakit as lk


def test_inspect_matches_the_spectrum_rank_and_effective_rank_of_the_full_delta():
    state, deltas = deficient_adapter()
    rows = {row["layer"]: row for row in lk.inspect(state)}
    assert rows.keys() == deltas.keys()
    for path, delta in deltas.items():
        row = rows[path]
        S = torch.linalg.svdvals(delta)
        assert (row["r"], row["alpha"], row["scale"]) == (4, 8.0, 2.0)
        assert row["shape"] == list(delta.shape)
        found = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(found, S[: found.numel()], atol=1e-9 * float(S[0]), rtol=1e-9)
        assert row["rank"] == lk.lowrank.rank(delta)
        assert row["effective_rank"] == pytest.approx(lk.lowrank.effective_rank(delta), rel=1e-6)
        torch.testing.assert_close(
            torch.tensor(row["energy"], dtype=torch.float64),
            lk.lowrank.energy(delta)[: found.numel()],
            atol=1e-9,
            rtol=0,
        )
    assert rows["full"]["rank"] == 4 and rows["deficient"]["rank"] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inspect_finds_the_rank_of_a_half_precision_adapter_above_its_storage_round_off(dtype):
    """PEFT saves factors in the model's dtype. Three 64 × 512 layers of r = 16: B of rank 3 before rounding
    (rounding makes it full rank, at round-off level), random factors (rank 16), B with repeated columns (8)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    repeated = randn(64, 16)
    repeated[:, 8:] = repeated[:, :8]
    factors = {
        "planted": (randn(16, 512), randn(64, 3) @ randn(3, 16)),
        "random": (randn(16, 512), randn(64, 16)),
        "repeated": (randn(16, 512), repeated),
    }
    state = adapter({path: (A.to(dtype), B.to(dtype)) for path, (A, B) in factors.items()}, alpha=16.0)
    rows = {row["layer"]: row for row in lk.inspect(state)}
    assert {path: row["rank"] for path, row in rows.items()} == {"planted": 3, "random": 16, "repeated": 8}
    for path, row in rows.items():  # the spectrum is that of the stored factors, computed in float64
        A, B = (t.to(dtype).double().numpy() for t in factors[path])
        S = np.linalg.svd(B @ A, compute_uv=False)[:16]
        np.testing.assert_allclose(row["singular_values"], S, rtol=1e-9, atol=1e-12 * S[0])


def test_compare_runs_one_svd_per_adapter_and_layer_and_keeps_the_pairwise_phi(monkeypatch):
    f1 = {"a.q": random_factors(40, 30, 6, 1, torch.float64), "a.v": random_factors(20, 50, 4, 2, torch.float64)}
    f2 = {"a.q": random_factors(40, 30, 5, 3, torch.float64), "a.v": random_factors(20, 50, 3, 4, torch.float64)}
    svd, calls = torch.linalg.svd, []
    monkeypatch.setattr(torch.linalg, "svd", lambda *args, **kwargs: calls.append(1) or svd(*args, **kwargs))
    rows = {row["layer"]: row for row in lk.compare(adapter(f1), adapter(f2))}
    assert len(calls) == 2 * 2  # two layers, one SVD of each adapter's A: not 2 · r₁ · r₂ per layer
    for path, row in rows.items():  # the pairwise definition, in numpy
        V1, V2 = (np.linalg.svd(f[path][0].numpy())[2] for f in (f1, f2))
        expected = [
            [np.linalg.norm(V1[:i] @ V2[:j].T) ** 2 / min(i, j) for j in range(1, row["r2"] + 1)]
            for i in range(1, row["r1"] + 1)
        ]
        np.testing.assert_allclose(row["phi"], expected, rtol=1e-9, atol=1e-12)


def test_compare_phi_comes_from_subspace_similarity_of_the_a_matrices_and_cosine_from_the_deltas():
    f1 = {"a.q": random_factors(40, 30, 4, 1), "a.v": random_factors(20, 50, 2, 2)}
    f2 = {"a.q": random_factors(40, 30, 3, 3), "b.o": random_factors(30, 30, 2, 4)}
    one, two = adapter(f1, alpha=8.0), adapter(f2, alpha=3.0)
    rows = list(lk.compare(one, two))
    assert [row["layer"] for row in rows] == ["a.q"]  # the one layer they share
    row = rows[0]
    (A1, B1), (A2, B2) = f1["a.q"], f2["a.q"]
    assert (row["r1"], row["r2"]) == (4, 3)
    expected_phi = [[lk.lowrank.subspace_similarity(A1, A2, i, j) for j in range(1, 4)] for i in range(1, 5)]
    torch.testing.assert_close(torch.tensor(row["phi"]), torch.tensor(expected_phi), atol=1e-6, rtol=0)
    d1, d2 = full(A1, B1, 8.0), full(A2, B2, 3.0)
    cosine = float((d1 * d2).sum() / (torch.linalg.matrix_norm(d1) * torch.linalg.matrix_norm(d2)))
    assert row["cosine"] == pytest.approx(cosine, abs=1e-9)


def test_compare_of_an_adapter_with_itself_is_1_and_with_its_negation_is_minus_1():
    state, _ = small_adapter()
    negated = lk.AdapterState(state.config, {k: -t if ".lora_B." in k else t for k, t in state.tensors.items()})
    for row in lk.compare(state, state):
        assert row["cosine"] == pytest.approx(1.0, abs=1e-9)
        assert [row["phi"][i][i] for i in range(row["r1"])] == pytest.approx([1.0] * row["r1"], abs=1e-5)
    for row in lk.compare(state, negated):
        assert row["cosine"] == pytest.approx(-1.0, abs=1e-9)
