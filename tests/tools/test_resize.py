"""`lk.resize` and `lk.combine` (lorakit.tools.resize).

- resize is `lowrank.approx` of the full ΔW, reports the energy it keeps, and never forms out × in (a
  200 000 × 200 000 layer resizes in moments);
- combine: "cat" is exact, "svd" the best rank-r fit with its error reported, "linear" only for equal ranks.
"""

import math
import re
import resource

import pytest
import torch
from helpers import (
    PREFIX,
    SMALL,
    adapter,
    full,
    layer_deltas,
    random_factors,
    relative,
    small_adapter,
    two_adapters,
    weighted_sum,
)

import lorakit as lk

# -- resize --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_resize_equals_lowrank_approx_of_the_full_delta(use_rslora):
    state, deltas = small_adapter(use_rslora)
    resized = lk.resize(state, r=3)
    found = layer_deltas(resized)
    for path, delta in deltas.items():
        best = lk.lowrank.approx(delta, 3, method="exact")
        torch.testing.assert_close(found[path], best, atol=1e-5, rtol=1e-5)
        S = torch.linalg.svdvals(delta)
        row = resized.report["layers"][path]
        assert (row["rank_before"], row["rank"]) == (SMALL[path][2], 3)
        kept = float(S[:3].square().sum() / S.square().sum())
        assert row["energy_kept"] == pytest.approx(kept, rel=1e-9)
        assert row["relative_error"] == pytest.approx(relative(best, delta), rel=1e-6)
        assert row["relative_error"] == pytest.approx(math.sqrt(1 - kept), rel=1e-6)


def test_resize_by_energy_keeps_the_rank_lowrank_picks_and_reads_a_directory(tmp_path):
    state, deltas = small_adapter()
    state.save(tmp_path / "adapter")
    resized = lk.resize(str(tmp_path / "adapter"), energy=0.8)
    found = layer_deltas(resized)
    for path, delta in deltas.items():
        k = lk.lowrank.rank_for_energy(delta, 0.8)
        assert 1 <= k < SMALL[path][2]
        assert resized.report["layers"][path]["rank"] == k
        assert resized.report["layers"][path]["energy_kept"] >= 0.8
        torch.testing.assert_close(found[path], lk.lowrank.approx(delta, k, method="exact"), atol=1e-5, rtol=1e-5)
    resized.save(tmp_path / "small")
    assert layer_deltas(lk.AdapterState.load(tmp_path / "small")).keys() == deltas.keys()


def test_resize_refuses_a_rank_above_the_adapters():
    state, _ = small_adapter()
    with pytest.raises(ValueError, match="larger than"):
        lk.resize(state, r=6)  # b.o has rank 4


def test_resize_of_an_adapter_whose_rank_exceeds_the_layer_caps_at_min_out_in():
    """r = 16 on an 8 × 40 layer: ΔW has rank at most 8, so 12 is refused by name and 6 is the best fit."""
    A, B = random_factors(8, 40, 16, seed=5)
    state = adapter({"narrow": (A, B)}, alpha=16.0)
    with pytest.raises(ValueError, match=re.escape("rank 12 is larger than layer narrow (8 × 40, rank 16) allows")):
        lk.resize(state, r=12)
    found = layer_deltas(lk.resize(state, r=6))["narrow"]
    torch.testing.assert_close(found, lk.lowrank.approx(full(A, B, 16.0), 6), atol=1e-5, rtol=1e-5)
    assert lk.resize(state, energy=1.0).report["layers"]["narrow"]["rank"] == 8


def gram_singular_values(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The singular values of s·B·A from r × r products: σ² are the eigenvalues of s²(BᵀB)(AAᵀ)."""
    A, B = A.double(), B.double()
    eig = torch.linalg.eigvals(s * s * (B.T @ B) @ (A @ A.T)).real.clamp(min=0)
    return eig.sqrt().sort(descending=True).values


def test_resize_never_forms_out_by_in_for_a_huge_layer():
    n, r = 200_000, 8  # ΔW would be 200 000 × 200 000 floats: 160 GB
    A, B = random_factors(n, n, r, seed=0)
    state = adapter({"huge": (A, B)}, alpha=16.0)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    resized = lk.resize(state, r=2)  # forming ΔW would fail outright: 160 GB on a 24 GB machine
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after - peak_before < 1_000_000  # under 1 GB more at the peak
    A2 = resized.tensors[f"{PREFIX}huge.lora_A.weight"]
    B2 = resized.tensors[f"{PREFIX}huge.lora_B.weight"]
    assert A2.shape == (2, n) and B2.shape == (n, 2)
    s2 = resized.config["alpha_pattern"].get("huge", resized.config["lora_alpha"]) / 2
    # its singular values are the top two of the original, and it is the orthogonal projection onto them:
    # ⟨ΔW₂, ΔW⟩_F = ‖ΔW₂‖²_F, all from r × r products
    S = gram_singular_values(A, B, 16.0 / r)
    torch.testing.assert_close(gram_singular_values(A2, B2, s2), S[:2], rtol=1e-4, atol=0)
    cross = float((((s2 * B2.double()).T @ ((16.0 / r) * B.double())) * (A2.double() @ A.double().T)).sum())
    assert cross == pytest.approx(float(S[:2].square().sum()), rel=1e-4)


# -- combine -------------------------------------------------------------------------------------------------------


def test_combine_cat_is_exact():
    one, two, d1, d2 = two_adapters()
    combined = lk.combine([one, two], [0.7, -1.3], method="cat")
    found = layer_deltas(combined)
    expected = weighted_sum(d1, d2, 0.7, -1.3)
    assert found.keys() == expected.keys()
    for path, delta in expected.items():
        torch.testing.assert_close(found[path], delta, atol=1e-10, rtol=1e-10)
        assert combined.report["layers"][path]["relative_error"] == 0.0
    assert combined.tensors[f"{PREFIX}a.q.lora_A.weight"].shape[0] == 3 + 5  # rank = sum of ranks


@pytest.mark.parametrize("r", [None, 4])
def test_combine_svd_is_the_best_rank_r_fit_with_its_error_reported(r):
    one, two, d1, d2 = two_adapters()
    combined = lk.combine([one, two], [0.7, -1.3], method="svd", r=r)
    found = layer_deltas(combined)
    largest_input_rank = {"a.q": 5, "a.v": 2, "b.o": 2}
    for path, delta in weighted_sum(d1, d2, 0.7, -1.3).items():
        k = min(r or largest_input_rank[path], lk.lowrank.rank(delta))
        best = lk.lowrank.approx(delta, k, method="exact")
        torch.testing.assert_close(found[path], best, atol=1e-8, rtol=1e-8)
        assert combined.report["layers"][path]["rank"] == k
        assert combined.report["layers"][path]["relative_error"] == pytest.approx(relative(best, delta), abs=1e-8)
    assert combined.report["layers"]["a.q"]["relative_error"] > 0.01  # rank 8 squeezed into 4 or 5


def test_combine_linear_refuses_unequal_ranks_and_reports_its_error_for_equal_ones():
    one, two, _, _ = two_adapters()
    with pytest.raises(ValueError, match="equal ranks"):
        lk.combine([one, two], method="linear")
    f1 = {"a.q": random_factors(40, 30, 3, 1, torch.float64)}
    f2 = {"a.q": random_factors(40, 30, 3, 2, torch.float64)}
    combined = lk.combine([adapter(f1, alpha=6.0), adapter(f2, alpha=6.0)], [0.5, 2.0], method="linear")
    exact = 0.5 * full(*f1["a.q"], 6.0) + 2.0 * full(*f2["a.q"], 6.0)
    error = relative(layer_deltas(combined)["a.q"], exact)
    assert combined.report["layers"]["a.q"]["relative_error"] == pytest.approx(error, rel=1e-6)


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_combine_refuses_mismatched_layer_shapes(method):
    one, two, _, _ = two_adapters(second_shapes={"a.q": (40, 31, 3)})
    with pytest.raises(ValueError, match="different shapes"):
        lk.combine([one, two], method=method)
