"""lk.LoRAParametrization: LoRA as a `torch.nn.utils.parametrize` parametrization of a layer's weight.

Shapes and initialisation, the exact base weight when disabled, agreement with lorakit's engine layers
(`lk.inject`) given the same factors, training that moves only A and B, and argument checks.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lorakit as lk


def parametrized_linear(in_features=10, out_features=6, rank=3, alpha=5, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    lora = lk.LoRAParametrization(*layer.weight.shape, rank=rank, alpha=alpha)
    parametrize.register_parametrization(layer, "weight", lora)
    return layer, lora


def randomize_b(lora, seed=1, std=0.02):
    """A non-zero B of the size training gives it (N(0, 1) factors would make float32 rounding exceed 1e-6)."""
    with torch.no_grad():
        lora.lora_B.copy_(std * torch.randn(lora.lora_B.shape, generator=torch.Generator().manual_seed(seed)))


def test_shapes_scale_and_defaults():
    lora = lk.LoRAParametrization(6, 10, rank=3, alpha=5)
    assert lora.lora_A.shape == (3, 10)  # (rank, features_out)
    assert lora.lora_B.shape == (6, 3)  # (features_in, rank)
    assert not lora.lora_B.any()
    assert lora.scale == pytest.approx(5 / 3)
    assert lora.enabled is True
    assert isinstance(lora.lora_A, nn.Parameter) and isinstance(lora.lora_B, nn.Parameter)
    assert lora.lora_A.device.type == "cpu" and lora.lora_B.device.type == "cpu"


def test_defaults_are_rank_one_alpha_one():
    lora = lk.LoRAParametrization(4, 7)
    assert lora.lora_A.shape == (1, 7) and lora.lora_B.shape == (4, 1)
    assert lora.scale == 1


def test_features_out_is_the_weights_second_dimension():
    layer = nn.Linear(784, 100)  # weight (100, 784)
    lora = lk.LoRAParametrization(*layer.weight.shape, rank=2)
    assert lora.lora_A.shape == (2, layer.weight.shape[1])
    assert lora.lora_B.shape == (layer.weight.shape[0], 2)
    assert (lora.lora_B @ lora.lora_A).shape == layer.weight.shape


def test_a_is_standard_normal():
    torch.manual_seed(0)
    A = lk.LoRAParametrization(8, 5000, rank=8).lora_A
    assert A.mean().item() == pytest.approx(0, abs=0.03)
    assert A.std().item() == pytest.approx(1, abs=0.03)


def test_fresh_parametrization_leaves_outputs_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    x = torch.randn(4, 10)
    before, weight = layer(x), layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", lk.LoRAParametrization(*layer.weight.shape, rank=3))
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer(x), before)


def test_weight_is_w_plus_scaled_b_a_when_enabled():
    layer, lora = parametrized_linear(rank=3, alpha=5)
    randomize_b(lora)
    W = layer.parametrizations.weight.original
    expected = W + (lora.lora_B @ lora.lora_A) * (5 / 3)
    torch.testing.assert_close(layer.weight, expected)
    assert not torch.allclose(layer.weight, W)


def test_disabled_gives_back_the_original_weight_exactly_even_after_training():
    layer, lora = parametrized_linear()
    original = layer.parametrizations.weight.original.detach().clone()
    layer.parametrizations.weight.original.requires_grad_(False)
    optimizer = torch.optim.SGD([lora.lora_A, lora.lora_B], lr=0.1)
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    assert lora.lora_B.abs().sum() > 0
    assert not torch.equal(layer.weight, original)
    lora.enabled = False
    assert torch.equal(layer.weight, original)
    torch.testing.assert_close(layer(x), F.linear(x, original, layer.bias), atol=0, rtol=0)
    lora.enabled = True
    assert not torch.equal(layer.weight, original)


@pytest.mark.parametrize("in_features, out_features, rank, alpha", [(10, 6, 3, 5), (7, 12, 1, 1), (16, 16, 4, 8)])
def test_same_factors_give_the_same_outputs_as_the_engine_layer(in_features, out_features, rank, alpha):
    layer, lora = parametrized_linear(in_features, out_features, rank, alpha)
    randomize_b(lora)
    # the engine, on a copy of the same base layer, with the same scale alpha / rank
    torch.manual_seed(0)
    engine = nn.Sequential(nn.Linear(in_features, out_features))
    assert torch.equal(engine[0].weight, layer.parametrizations.weight.original)
    lk.inject(engine, lk.LoraConfig(r=rank, alpha=alpha, target_modules=["0"]))
    wrapped = engine[0]
    # the engine's A is (r, in) = (rank, features_out), its B (out, r) = (features_in, rank)
    assert wrapped.lora_A["default"].shape == lora.lora_A.shape
    assert wrapped.lora_B["default"].shape == lora.lora_B.shape
    assert wrapped.scale["default"] == pytest.approx(lora.scale)
    with torch.no_grad():
        wrapped.lora_A["default"].copy_(lora.lora_A)
        wrapped.lora_B["default"].copy_(lora.lora_B)
    x = torch.randn(5, 3, in_features, generator=torch.Generator().manual_seed(3))
    assert (layer(x) - F.linear(x, layer.parametrizations.weight.original, layer.bias)).abs().max() > 1e-2
    torch.testing.assert_close(engine(x), layer(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(wrapped.delta_weight("default"), layer.weight - layer.parametrizations.weight.original)


def test_training_updates_only_a_and_b():
    layer, lora = parametrized_linear()
    layer.parametrizations.weight.original.requires_grad_(False)
    layer.bias.requires_grad_(False)
    frozen = {name: p.detach().clone() for name, p in layer.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"bias", "parametrizations.weight.original"}
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(lora.lora_A), id(lora.lora_B)}
    A, B = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    target = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        assert layer.parametrizations.weight.original.grad is None
        optimizer.step()
        losses.append(loss.item())
    for name, p in layer.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not torch.equal(lora.lora_A, A) and not torch.equal(lora.lora_B, B)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("rank", [0, -1, -5])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lk.LoRAParametrization(4, 4, rank=rank)


def test_factors_of_the_transposed_shape_are_refused_not_reshaped():
    layer = nn.Linear(784, 1000)  # weight (1000, 784): same size as 784 × 1000, another shape
    with pytest.raises(ValueError, match=r"\(784, 1000\) update for a weight of shape \(1000, 784\)"):
        parametrize.register_parametrization(layer, "weight", lk.LoRAParametrization(784, 1000, rank=1))


def test_a_conv_layer_is_updated_as_its_flattened_matrix_and_a_wrong_shape_names_the_right_one():
    conv = nn.Conv2d(3, 8, kernel_size=3)  # weight (8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"LoRAParametrization\(8, 27\)"):
        parametrize.register_parametrization(conv, "weight", lk.LoRAParametrization(*conv.weight.shape[:2]))
    lora = lk.LoRAParametrization(8, 27, rank=2)
    parametrize.register_parametrization(conv, "weight", lora)
    randomize_b(lora)
    W = conv.parametrizations.weight.original
    expected = W + (lora.lora_B @ lora.lora_A).view(W.shape) * lora.scale
    torch.testing.assert_close(conv.weight, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_layer_keeps_its_dtype_and_float32_factors(dtype):
    layer = nn.Linear(10, 6).to(dtype)
    lora = lk.LoRAParametrization(*layer.weight.shape, rank=2)
    parametrize.register_parametrization(layer, "weight", lora)
    randomize_b(lora)
    assert layer.weight.dtype == dtype and lora.lora_A.dtype == lora.lora_B.dtype == torch.float32
    W = layer.parametrizations.weight.original.float()
    torch.testing.assert_close(layer.weight.float(), W + lora.lora_B @ lora.lora_A * lora.scale, rtol=1e-2, atol=1e-2)
    layer(torch.randn(4, 10, dtype=dtype)).float().sum().backward()
    assert lora.lora_B.grad is not None and lora.lora_B.grad.dtype == torch.float32
