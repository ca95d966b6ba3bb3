"""lorakit.study.truncation: each weight replaced by its best rank-k approximation, checked against numpy's SVD."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from lorakit.study.truncation import truncation_sweep


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(first=nn.Linear(12, 20), act=nn.ReLU(), second=nn.Linear(20, 6)))


def numpy_truncation(W: np.ndarray, k: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_each_level_sets_every_weight_to_its_best_rank_k_approximation():
    model, seen = net(), []
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}

    def evaluate(m: nn.Module) -> float:  # records the weights each level evaluates
        seen.append(
            {path: m.get_submodule(path).weight.detach().double().numpy().copy() for path in ("first", "second")}
        )
        return 0.5

    result = truncation_sweep(model, evaluate, ["first", "second"], fractions=(0.25, 1.0), energies=(0.9,))
    assert len(seen) == 3 and [row["level"] for row in result["fraction"]] == [0.25, 1.0]
    for path, full_rank in (("first", 12), ("second", 6)):
        W = originals[f"{path}.weight"].double().numpy()
        k = math.ceil(0.25 * full_rank)
        np.testing.assert_allclose(seen[0][path], numpy_truncation(W, k), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen[1][path], W, rtol=1e-5, atol=1e-6)  # full rank: W itself
        S = np.linalg.svd(W, compute_uv=False)
        k90 = int(np.searchsorted(np.cumsum(S**2) / np.sum(S**2), 0.9) + 1)  # fewest values with 90% of Σσ²
        np.testing.assert_allclose(seen[2][path], numpy_truncation(W, k90), rtol=1e-5, atol=1e-6)
    quarter = result["fraction"][0]
    assert quarter["rank_kept"] == pytest.approx((3 + 2) / 18)
    assert quarter["stored"] == pytest.approx((3 * 32 + 2 * 26) / (240 + 120))
    assert result["fraction"][1]["energy_kept"] == pytest.approx(1.0)
    assert result["energy"][0]["energy_kept"] >= 0.9
    for name, p in model.named_parameters():  # restored bit for bit
        assert torch.equal(p, originals[name])


def test_weights_are_restored_when_the_evaluation_fails():
    model = net()
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}

    def failing(m):
        raise RuntimeError("evaluation broke")

    with pytest.raises(RuntimeError, match="evaluation broke"):
        truncation_sweep(model, failing, ["first"])
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


def test_a_module_without_a_matrix_is_refused():
    with pytest.raises(ValueError, match="act has no 2-D weight"):
        truncation_sweep(net(), lambda m: 1.0, ["act"])
