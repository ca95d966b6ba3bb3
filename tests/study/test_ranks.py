"""lorakit.study.ranks: LoRA runs of the study and the LoRA paper's amplification (its table 7), against numpy."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import lorakit as lk
from lorakit.engine.model import lora_layers
from lorakit.study.ranks import ADAPTER, amplification, train_lora
from lorakit.study.recipe import Recipe
from lorakit.study.tasks import Task


def adapted_linear(r: int, seed: int = 0) -> tuple[str, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(layer=nn.Linear(24, 16)))
    lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, target_modules=["layer"]), ADAPTER)
    path, layer = next(lora_layers(model))
    with torch.no_grad():
        layer.lora_B[ADAPTER].normal_()  # a non-zero ΔW
    return path, layer


@pytest.mark.parametrize("r", [1, 4])
def test_amplification_matches_numpy(r):
    path, layer = adapted_linear(r)
    row = amplification(path, layer, seed=0)
    W = layer.weight.detach().double().numpy()
    A, B = (factor[ADAPTER].detach().double().numpy() for factor in (layer.lora_A, layer.lora_B))
    delta = 2.0 * B @ A  # α / r = 2
    U, _, Vh = np.linalg.svd(delta)
    U, V = U[:, :r], Vh[:r].T
    in_delta = np.linalg.norm(U.T @ W @ V)
    assert row["r"] == r and row["shape"] == [16, 24]
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    assert row["weight_norm"] == pytest.approx(np.linalg.norm(W), rel=1e-6)
    assert row["delta_directions"] == pytest.approx(in_delta, rel=1e-5)
    assert row["weight_directions"] == pytest.approx(np.linalg.norm(np.linalg.svd(W, compute_uv=False)[:r]), rel=1e-6)
    assert row["amplification"] == pytest.approx(np.linalg.norm(delta) / in_delta, rel=1e-5)
    # no r directions hold more of W than its own top-r ones (Eckart–Young): ΔW's and random ones hold less
    assert row["delta_directions"] <= row["weight_directions"] + 1e-9
    assert row["random_directions"] <= row["weight_directions"] + 1e-9
    assert row["random_amplification"] == pytest.approx(row["delta_norm"] / row["random_directions"])


def test_random_directions_are_seeded():
    path, layer = adapted_linear(2)
    assert amplification(path, layer, 3) == amplification(path, layer, 3)
    assert amplification(path, layer, 3)["random_directions"] != amplification(path, layer, 4)["random_directions"]


def tiny_task() -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(first=nn.Linear(6, 10), act=nn.ReLU(), second=nn.Linear(10, 3)))
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def loss(m, generator):
        batch = torch.randint(0, 64, (16,), generator=generator)
        return F.cross_entropy(m(x[batch]), y[batch])

    @torch.no_grad()
    def evaluate(m):
        return float((m(x).argmax(1) == y).float().mean())

    return Task("tiny", model.eval(), loss, evaluate, Recipe(steps=30, full_lr=1e-2, lora_lr=1e-2, subspace_lr=0.1))


def test_a_lora_run_trains_a_copy_and_reports_its_parameters_and_amplification():
    task = tiny_task()
    before = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    point, model = train_lora(task, r=2, seed=0, targets="all", console=Console(quiet=True))
    assert point["trainable"] == 2 * (6 + 10) + 2 * (10 + 3)  # r (in + out) per Linear ("all": every Linear)
    assert [row["layer"] for row in point["amplification"]] == ["first", "second"]
    assert 0 <= point["metric"] <= 1 and point["loss"] > 0
    assert any(
        not torch.equal(layer.lora_B[ADAPTER], torch.zeros_like(layer.lora_B[ADAPTER]))
        for _, layer in lora_layers(model)
    )
    for name, p in task.model.named_parameters():  # θ₀ is left as it was
        assert torch.equal(p, before[name])
