"""lorakit.study.intrinsic: training in a random subspace (DID, SAID) and the d90 search (grid, bracket, bisection)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lorakit as lk
from lorakit.study.intrinsic import SubspaceModel, intrinsic_dimension, log_grid, subspace_parameters
from lorakit.study.recipe import Recipe

RECIPE = Recipe(steps=1, full_lr=1e-3, lora_lr=1e-3, subspace_lr=0.1)


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(body=nn.Linear(8, 16), act=nn.Tanh(), head=nn.Linear(16, 3)))  # D = 195


def test_intrinsic_dimension_is_public_api():
    assert lk.intrinsic_dimension is intrinsic_dimension
    assert "intrinsic_dimension" in lk.__all__


def test_a_subspace_at_zero_is_the_model_itself_and_never_writes_it():
    net = small_net()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    x = torch.randn(5, 8)
    for method, d in (("did", 20), ("said", 20)):
        subspace = SubspaceModel(net, d, method)
        torch.testing.assert_close(subspace(x), net(x))
        subspace.theta.data.normal_()
        assert not torch.allclose(subspace(x), net(x))
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name])


def test_did_trains_d_numbers_and_said_counts_its_scales_in_d():
    net = small_net()
    did, said = SubspaceModel(net, 50, "did"), SubspaceModel(net, 50, "said")
    assert sum(p.numel() for p in did.trainable()) == 50
    assert said.scales.numel() == 4  # one per tensor: two weights, two biases
    assert said.theta.numel() == 46
    assert sum(p.numel() for p in said.trainable()) == 50
    with pytest.raises(ValueError, match=r"d must be an integer in \[5, 199\] for SAID"):
        SubspaceModel(net, 4, "said")
    with pytest.raises(ValueError, match="method must be one of"):
        SubspaceModel(net, 4, "lora")


@pytest.mark.parametrize("method", ["did", "said"])
def test_the_gradient_of_theta_is_the_projected_gradient_of_the_weights(method):
    net, x = small_net(), torch.randn(7, 8)
    subspace = SubspaceModel(net, 30, method, projection="dense", seed=4)
    subspace(x).square().sum().backward()
    params = {name: p.detach().clone().requires_grad_(True) for name, p in net.named_parameters()}
    functional_call(net, params, (x,)).square().sum().backward()
    flat = torch.cat([params[name].grad.flatten() for name in subspace.names])  # ∇_θ L at θ₀, (D,)
    P = subspace.projection.matrix  # (D, d − m)
    torch.testing.assert_close(subspace.theta.grad, P.T @ flat, rtol=1e-4, atol=1e-5)
    if method == "said":  # at θ_d = 0 the scales multiply a zero offset
        torch.testing.assert_close(subspace.scales.grad, torch.zeros(4))


def test_subspace_parameters_picks_targets_as_lora_does_and_always_the_head():
    net = small_net()
    assert subspace_parameters(net) == ["body.weight", "body.bias", "head.weight", "head.bias"]
    assert subspace_parameters(net, ["body"]) == ["body.weight", "body.bias"]
    assert subspace_parameters(net, ["body"], head=["head"]) == [name for name, _ in net.named_parameters()]
    with pytest.raises(ValueError):
        subspace_parameters(net, ["nothing_here"])


def test_a_full_dimensional_subspace_fits_a_linear_regression():
    torch.manual_seed(0)
    net, x = nn.Linear(8, 1), torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.5
    loss = lambda model, generator: (model(x) - y).square().mean()  # noqa: E731
    evaluate = torch.no_grad()(lambda model: -float((model(x) - y).square().mean()))
    recipe = Recipe(steps=400, full_lr=0.0, lora_lr=0.0, subspace_lr=0.1)
    result = intrinsic_dimension(
        net, loss, evaluate, reference=-1.0, recipe=recipe, grid=[9], bisections=0, projection="dense"
    )
    start, trained = result.points
    assert start["d"] == 0 and trained["d"] == 9
    assert -trained["metric"] < -start["metric"] / 100, (start, trained)  # the error shrinks a hundredfold


class MetricByDimension:
    """A stand-in for training: the metric of a subspace is min(1, d / 300), so d90 = 270 exactly."""

    def __init__(self):
        self.trained = []

    def loss(self, model, generator):
        if not self.trained or self.trained[-1] != model.d:
            self.trained.append(model.d)
        return model.theta.square().sum()

    @staticmethod
    def evaluate(model):
        return min(1.0, getattr(model, "d", 0) / 300)


def test_d90_is_bracketed_on_the_grid_then_narrowed_by_bisection():
    fake, net = MetricByDimension(), nn.Linear(64, 64)  # D = 4160
    result = intrinsic_dimension(net, fake.loss, fake.evaluate, reference=1.0, recipe=RECIPE, bisections=2)
    # grid 16, 64, 256 fail; 1024 and 4096 reach 0.9 (two in a row: the sweep stops); bracket (256, 1024);
    # midpoints √(256·1024) = 512 (reaches) and √(256·512) ≈ 362 (reaches)
    assert fake.trained == [16, 64, 256, 1024, 4096, 512, 362]
    assert result.d90 == 362 and result.bracket == (256, 362)
    assert result.threshold == pytest.approx(0.9)
    assert [p["d"] for p in result.points] == [0, 16, 64, 256, 362, 512, 1024, 4096]
    assert result.D == 4160 and result.tensors == 2


def test_finished_points_are_not_trained_again():
    fake, net, done = MetricByDimension(), nn.Linear(64, 64), {}
    first = intrinsic_dimension(net, fake.loss, fake.evaluate, 1.0, RECIPE, bisections=1, done=done)
    assert set(done) == {f"did-{d}" for d in (0, 16, 64, 256, 512, 1024, 4096)}
    fake.trained.clear()
    again = intrinsic_dimension(net, fake.loss, fake.evaluate, 1.0, RECIPE, bisections=2, done=done)
    assert fake.trained == [362]  # only the new midpoint
    assert (first.d90, again.d90) == (512, 362)


def test_no_d90_when_the_grid_never_reaches_the_threshold():
    fake, net = MetricByDimension(), nn.Linear(4, 4)  # D = 20: d ≤ 20 reaches at most 20/300
    result = intrinsic_dimension(net, fake.loss, fake.evaluate, 1.0, RECIPE)
    assert result.d90 is None and result.bracket is None
    assert [p["d"] for p in result.points] == [0, 16]


def test_log_grid_and_bad_arguments():
    assert log_grid(5000) == [16, 64, 256, 1024, 4096]
    net, fake = nn.Linear(4, 4), MetricByDimension()
    for kwargs, message in (
        ({"method": "x"}, "method must be one of"),
        ({"fraction": 1.5}, "fraction must be in"),
        ({"bisections": -1}, "bisections must be"),
        ({"projection": "sparse"}, "projection must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            intrinsic_dimension(net, fake.loss, fake.evaluate, 1.0, RECIPE, **kwargs)
