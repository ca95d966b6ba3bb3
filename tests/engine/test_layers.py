"""The LoRA layers (lorakit.engine.layers) by kind: the forward formula, factored outputs equal to the merged
full weight for Embedding and Conv layers, the initialisations, several active adapters adding up, and an
Embedding's max_norm."""

import copy

import pytest
import torch
from helpers import ALL
from torch import nn

import lorakit as lk
from lorakit.engine import model as engine_model
from lorakit.engine.layers import LoraConv, LoraEmbedding


def test_fresh_adapter_leaves_outputs_exactly_unchanged(net, tokens):
    before = net(tokens)
    lk.inject(net, lk.LoraConfig(r=4, alpha=8, target_modules=ALL))
    assert torch.equal(net(tokens), before)
    for _, layer in engine_model.lora_layers(net):
        assert not layer.lora_B["default"].any() or isinstance(layer, LoraEmbedding)
        if isinstance(layer, LoraEmbedding):  # PEFT's embedding init: A zero, B normal
            assert not layer.lora_A["default"].any() and layer.lora_B["default"].any()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_forward_is_base_plus_scaled_low_rank_path(use_rslora):
    torch.manual_seed(0)
    linear = nn.Linear(10, 6)
    model = nn.Sequential(linear)
    lk.inject(model, lk.LoraConfig(r=4, alpha=6, target_modules=["0"], init=False, use_rslora=use_rslora))
    layer = model[0]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    s = 6 / 4**0.5 if use_rslora else 6 / 4
    assert layer.scale["default"] == pytest.approx(s)
    x = torch.randn(3, 5, 10)
    expected = x @ linear.weight.T + linear.bias + s * (x @ A.T) @ B.T
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kind", ["embedding", "conv1d", "conv2d", "conv3d"])
def test_factored_forward_equals_the_merged_full_weight(kind):
    torch.manual_seed(0)
    base, x = {
        "embedding": (nn.Embedding(20, 6, padding_idx=0), torch.randint(0, 20, (3, 5))),
        "conv1d": (nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9)),
        "conv2d": (nn.Conv2d(4, 6, (3, 2), padding=1, dilation=(1, 2)), torch.randn(2, 4, 8, 8)),
        "conv3d": (nn.Conv3d(2, 3, 2), torch.randn(2, 2, 4, 4, 4)),
    }[kind]
    model = nn.Sequential(base)
    lk.inject(model, lk.LoraConfig(r=3, alpha=5, target_modules=["0"], init=False))
    assert isinstance(model[0], LoraEmbedding if kind == "embedding" else LoraConv)
    unmerged = model(x)
    merged = copy.deepcopy(model)
    lk.merge(merged)
    torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)
    with lk.disabled(model):
        assert not torch.allclose(model(x), unmerged)


def test_gaussian_init_draws_a_with_std_one_over_r_and_b_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4000, 8))
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"], init="gaussian"))
    assert model[0].lora_A["default"].std().item() == pytest.approx(1 / 4, rel=0.05)
    assert not model[0].lora_B["default"].any()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"], init="gaussian", init_std=0.02), "b")
    assert model[0].lora_A["b"].std().item() == pytest.approx(0.02, rel=0.05)


def test_kaiming_init_matches_loralib_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 8))
    lk.inject(model, lk.LoraConfig(r=64, target_modules=["0"]))
    A = model[0].lora_A["default"]
    # kaiming_uniform with a=√5: bound = 1/√fan_in
    assert A.abs().max().item() <= 1 / 400**0.5
    assert A.abs().max().item() > 0.9 / 400**0.5


def test_several_active_adapters_add_up(net, tokens):
    base = net(tokens)
    lk.inject(net, lk.LoraConfig(r=2, alpha=2, target_modules=ALL, init=False), "a")
    lk.inject(net, lk.LoraConfig(r=3, alpha=6, target_modules=["hidden"], init=False), "b")
    assert lk.adapter_names(net) == ["a", "b"]
    # inject makes the new adapter the active one
    out_b = net(tokens)
    lk.set_adapter(net, "a")
    out_a = net(tokens)
    # the model is not linear in its layers' outputs, so compare one layer
    lk.set_adapter(net, ["a", "b"])
    layer = net.hidden
    h = torch.randn(2, 12)
    both = layer(h)
    lk.set_adapter(net, "a")
    only_a = layer(h)
    lk.set_adapter(net, "b")
    only_b = layer(h)
    torch.testing.assert_close(both - layer.base(h), (only_a - layer.base(h)) + (only_b - layer.base(h)))
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)


def test_an_embedding_with_max_norm_leaves_the_adapter_as_it_was_and_mixed_batches_agree():
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), lk.LoraConfig(r=3, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_A["default"].normal_(std=5)  # columns far above the base's max_norm
    A = model[0].lora_A["default"].detach().clone()
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        y = model(tokens)
        assert torch.equal(model[0].lora_A["default"], A)  # the base's max_norm is for its own rows only
        torch.testing.assert_close(lk.forward_per_sample(model, ["default", "default"], tokens), y)
