"""lorakit.study.fastfood: the Walsh–Hadamard transform against scipy, the Fastfood projection against the dense
Gaussian one it stands in for (column norms, near-orthogonality, transpose, nesting) and its O(D) memory."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from lorakit.study.fastfood import DENSE_MAX_ENTRIES, DenseProjection, FastfoodProjection, fwht


def columns(projection, D: int, d: int) -> torch.Tensor:
    """The projection as a D × d matrix, one column per unit vector (small D only)."""
    return projection(torch.eye(d, dtype=torch.float32)).T.double()  # (D, d)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 128, 256, 2048])
def test_walsh_hadamard_equals_scipy_hadamard(n):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = x.numpy() @ hadamard(n)
    np.testing.assert_allclose(fwht(x).numpy(), expected, rtol=1e-12, atol=1e-9)


def test_walsh_hadamard_of_a_long_vector_is_its_own_inverse_up_to_n():
    x = torch.randn(2**15, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # three factors
    torch.testing.assert_close(fwht(fwht(x)) / 2**15, x)


@pytest.mark.parametrize("n", [0, 3, 100])
def test_walsh_hadamard_refuses_a_length_that_is_no_power_of_two(n):
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(n))


def column_statistics(P: torch.Tensor) -> tuple[float, float, float, float]:
    """Mean and spread of the squared column norms, the spread of the off-diagonal cosines (times √D) and their mean."""
    norms = P.norm(dim=0)
    cosines = (P.T @ P) / torch.outer(norms, norms)
    off = cosines[~torch.eye(P.shape[1], dtype=torch.bool)]
    return (
        float(norms.square().mean()),
        float(norms.square().std()),
        float(off.std() * P.shape[0] ** 0.5),
        float(off.mean()),
    )


@pytest.mark.parametrize("D", [5000, 4096])  # cut from L = 8192 rows, and D a power of two (norms exact)
def test_fastfood_columns_have_the_norms_and_near_orthogonality_of_the_dense_gaussian(D):
    d = 128
    fastfood = column_statistics(columns(FastfoodProjection(D, seed=1), D, d))
    dense = column_statistics(DenseProjection(D, d, seed=1).matrix.double())
    # unit columns on average: mean of the squared norms within a few standard errors of 1 (exactly 1 for dense)
    assert dense[0] == pytest.approx(1.0, abs=1e-6)
    assert fastfood[0] == pytest.approx(1.0, abs=0.02)
    if D == 4096:
        assert fastfood[1] < 1e-5  # every column keeps all L rows: norm 1 exactly
    # cosines between columns: mean 0 and spread 1/√D for independent Gaussian columns; Fastfood's are of the same
    # order, about 1.3/√D here (its G enters squared: heavier tails than one Gaussian), far from D × d's worth
    assert dense[2] == pytest.approx(1.0, abs=0.05)
    assert 0.9 < fastfood[2] < 1.6
    assert abs(fastfood[3]) < 3 / D**0.5 and abs(dense[3]) < 3 / D**0.5


def test_fastfood_backward_applies_the_transpose():
    D, d = 3000, 40
    projection = FastfoodProjection(D, seed=2)
    P = columns(projection, D, d)  # (D, d)
    theta = torch.randn(d, requires_grad=True, generator=torch.Generator().manual_seed(0))
    g = torch.randn(D, generator=torch.Generator().manual_seed(1))
    (projection(theta) @ g).backward()
    torch.testing.assert_close(theta.grad.double(), P.T @ g.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(projection(theta.detach()).double(), P @ theta.detach().double(), rtol=1e-4, atol=1e-5)


def test_subspaces_of_one_seed_are_nested():
    D = 2000
    small, large = FastfoodProjection(D, seed=3), FastfoodProjection(D, seed=3)
    torch.testing.assert_close(columns(small, D, 10), columns(large, D, 50)[:, :10])
    dense_small, dense_large = DenseProjection(D, 10, seed=3), DenseProjection(D, 50, seed=3)
    torch.testing.assert_close(dense_small.matrix, dense_large.matrix[:, :10])


def test_fastfood_beyond_one_block_stacks_independent_blocks():
    projection = FastfoodProjection(2**20 + 5, seed=0)
    assert (projection.blocks, projection.L) == (2, 2**20)
    y = projection(torch.ones(3))
    assert y.shape == (2**20 + 5,) and torch.isfinite(y).all()
    assert float(y.square().sum()) == pytest.approx(3.0, rel=0.05)  # three near-orthogonal unit columns


def test_bad_dimensions_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="positive integer"):
        FastfoodProjection(0)
    with pytest.raises(ValueError, match="exceeds"):
        FastfoodProjection(10)(torch.zeros(11))
    with pytest.raises(ValueError, match="use the fastfood projection"):
        DenseProjection(DENSE_MAX_ENTRIES, 2)


MEMORY_PROBE = """
import json, resource, sys, torch
from lorakit.study.fastfood import FastfoodProjection
torch.set_num_threads(1)
D, d = int(sys.argv[1]), int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
projection = FastfoodProjection(D, seed=0)
theta = torch.zeros(d, requires_grad=True)
projection(theta).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
buffers = sum(b.numel() * b.element_size() for b in projection.buffers())
print(json.dumps({"peak": after - before, "buffers": buffers, "grad": theta.grad.shape[0]}))
"""


@pytest.mark.slow
def test_fastfood_memory_for_a_minilm_sized_model_is_linear_in_D():
    D, d = 22_713_216, 1000  # all-MiniLM-L6-v2's parameters: a dense P would hold 22.7e9 numbers (91 GB)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(D), str(d)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout)
    assert measured["grad"] == d
    assert measured["buffers"] <= 14 * D  # signs, permutation and its inverse, Gaussians: 13 bytes a row
    # the peak of building P and one forward and backward: a few vectors of D floats (about 13 bytes a parameter
    # measured), nothing of size D × d (a dense P: 4·d = 4,000 bytes a parameter)
    assert measured["peak"] < 48 * D, measured
