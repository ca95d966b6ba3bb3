"""Adapters without a model (lorakit.tools.stored): AdapterState's files and its layers' factors and scales,
what is refused as not a pair of factors, the rank-or-energy arguments every tool checks before reading
anything, and the per-layer patterns written for layers whose paths end alike."""

import json
import re

import pytest
import torch
from helpers import PREFIX, adapter, random_factors, small_adapter
from peft import PeftModel
from torch import nn

import lorakit as lk
from lorakit.engine.peft_format import peft_config_dict
from lorakit.tools.stored import (
    AdapterState,
    check_rank_or_energy,
    check_same_shapes,
    chosen_rank,
    state_from_layers,
)

W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("energy", [0, -0.5, 1.5])
def test_api_refuses_an_energy_fraction_outside_0_1(energy):
    base = {"w.weight": W}
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\]"):
        lk.extract(base, {"w.weight": W + 1}, energy=energy)
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\]"):
        lk.resize(small_adapter()[0], energy=energy)


def test_api_checks_the_rank_and_energy_arguments_before_reading_anything(tmp_path):
    nowhere = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape("energy fraction must be in (0, 1], got 1.5")):
        lk.extract(nowhere, nowhere, energy=1.5)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        lk.resize(nowhere, r=0)
    with pytest.raises(ValueError, match="exactly one of a rank or an energy fraction"):
        lk.resize(nowhere, r=2, energy=0.5)
    with pytest.raises(ValueError, match="rank must be a positive integer, got -1"):
        lk.combine([nowhere, nowhere], r=-1)
    with pytest.raises(ValueError, match="a rank only applies to method 'svd'"):
        lk.combine([nowhere, nowhere], method="cat", r=2)


class Nested(nn.Module):
    """Two layers whose paths end alike: "fc" and "block.fc"."""

    def __init__(self):
        super().__init__()
        self.fc, self.block = nn.Linear(6, 6), nn.Sequential()
        self.block.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.block.fc(self.fc(x))


def test_per_layer_ranks_of_paths_that_end_alike_reload_in_lorakit_and_peft(tmp_path):
    def base():
        torch.manual_seed(0)
        return Nested().double()

    model = lk.inject(base(), lk.LoraConfig(r=4, alpha=4, target_modules=["fc"], init=False))
    with torch.no_grad():
        model.fc.lora_B["default"][:, 1:] = 0  # fc's update has rank 1, block.fc's rank 4
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x).detach()
    lk.save_adapter(model, tmp_path / "a")
    resized = lk.resize(tmp_path / "a", energy=0.999)
    assert {path: layer["rank"] for path, layer in resized.report["layers"].items()} == {"block.fc": 4, "fc": 1}
    resized.save(tmp_path / "b")
    ours = lk.load_adapter(base(), tmp_path / "b")
    theirs = PeftModel.from_pretrained(base(), tmp_path / "b")
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(theirs(x), expected)


def test_a_saved_state_loads_back_with_its_config_and_tensors_and_a_report_beside_them(tmp_path):
    state, _ = small_adapter()
    state.report = {"layers": {"a.q": {"rank": 6}}}
    saved = state.save(tmp_path / "adapter")
    names = sorted(p.name for p in saved.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "report.json"]
    assert json.loads((saved / "report.json").read_text()) == state.report
    loaded = AdapterState.load(saved)
    assert loaded.config == state.config
    assert loaded.tensors.keys() == state.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) for k, t in state.tensors.items())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_each_layers_scale_comes_from_the_config_and_its_stored_rank(use_rslora):
    state, _ = small_adapter(use_rslora)
    layers = state.layers()
    assert [layer.path for layer in layers] == ["a.q", "a.v", "b.o"]  # file order
    root = (lambda r: r**0.5) if use_rslora else (lambda r: r)
    expected = {"a.q": (6, 12 / root(6)), "a.v": (5, 3 / root(5)), "b.o": (4, 12 / root(4))}
    assert {layer.path: (layer.rank, layer.scale) for layer in layers} == {
        path: (r, pytest.approx(scale)) for path, (r, scale) in expected.items()
    }


def test_conv_factors_are_read_as_matrices_and_written_back_in_their_stored_layout():
    A = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(0))  # r × in_channels × 3 × 3
    B = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(1))  # out_channels × r × 1 × 1
    config = peft_config_dict(task_type=None, base_model_name_or_path=None, r=2, lora_alpha=2, target_modules=["c"])
    (layer,) = AdapterState(config, {f"{PREFIX}c.lora_A.weight": A, f"{PREFIX}c.lora_B.weight": B}).layers()
    assert (layer.A.shape, layer.B.shape, layer.kind) == ((2, 27), (4, 2), "linear")
    A1, B1 = layer.stored(layer.A[:1], layer.B[:, :1])
    assert A1.shape == (1, 3, 3, 3) and B1.shape == (4, 1, 1, 1)
    assert torch.equal(A1, A[:1]) and torch.equal(B1, B[:, :1])


A_KEY, B_KEY = f"{PREFIX}w.lora_A.weight", f"{PREFIX}w.lora_B.weight"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({A_KEY: torch.ones(2, 6)}, f"adapter has {A_KEY} but no {B_KEY}"),
        ({f"{PREFIX}head.weight": torch.ones(3, 3)}, "the adapter has no LoRA factors"),
        ({A_KEY: torch.ones(2, 6), B_KEY: torch.ones(8, 3)}, "are not the two factors of one rank-r update"),
        ({A_KEY: torch.ones(2, 6), B_KEY: torch.full((8, 2), float("nan"))}, "holds NaN or inf"),
    ],
    ids=["no-b", "no-factors", "ranks-differ", "nan"],
)
def test_what_is_not_pairs_of_finite_factors_is_refused(tensors, message):
    config = peft_config_dict(task_type=None, base_model_name_or_path=None, r=2, lora_alpha=2, target_modules=["w"])
    with pytest.raises(ValueError) as error:
        AdapterState(config, tensors).layers()
    assert message in str(error.value)


def test_exactly_one_of_a_positive_rank_or_an_energy_fraction_is_taken():
    check_rank_or_energy(2, None)
    check_rank_or_energy(None, 1.0)
    for r, energy, message in [
        (None, None, "give exactly one of a rank or an energy fraction"),
        (2, 0.5, "give exactly one of a rank or an energy fraction"),
        (0, None, "rank must be a positive integer, got 0"),
        (None, 0.0, "energy fraction must be in (0, 1], got 0.0"),
    ]:
        with pytest.raises(ValueError) as error:
            check_rank_or_energy(r, energy)
        assert str(error.value) == message


def test_the_chosen_rank_is_the_one_asked_for_up_to_the_limit_or_the_smallest_holding_the_energy():
    S = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # energies 9/14, 13/14, 1
    assert chosen_rank(S, 3, 2, None, "layer w") == 2
    with pytest.raises(ValueError, match=r"rank 4 is larger than layer w allows \(at most 3\)"):
        chosen_rank(S, 3, 4, None, "layer w")
    assert [chosen_rank(S, 3, None, e, "w") for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    assert chosen_rank(torch.zeros(3, dtype=torch.float64), 3, None, 0.5, "w") == 1  # never rank 0


def test_layers_rebuilt_from_new_factors_have_scale_one_and_patterns_anchored_at_the_start():
    state, _ = small_adapter()
    layers = state.layers()
    ranks = {"a.q": 3, "a.v": 2, "b.o": 3}
    factors = {layer.path: (layer.A[: ranks[layer.path]], layer.B[:, : ranks[layer.path]]) for layer in layers}
    rebuilt = state_from_layers(layers, factors, {"task_type": "CAUSAL_LM", "fan_in_fan_out": False})
    assert rebuilt.config["r"] == 3 and rebuilt.config["task_type"] == "CAUSAL_LM"
    assert rebuilt.config["rank_pattern"] == rebuilt.config["alpha_pattern"] == {r"^a\.v": 2}
    assert {layer.path: (layer.rank, layer.scale) for layer in rebuilt.layers()} == {
        "a.q": (3, 1.0),
        "a.v": (2, 1.0),
        "b.o": (3, 1.0),
    }


def test_layers_of_other_shapes_in_two_adapters_are_refused():
    one = adapter({"w": random_factors(8, 6, 2, seed=1)}).layers()[0]
    other = adapter({"w": random_factors(8, 7, 2, seed=2)}).layers()[0]
    check_same_shapes("w", [one, one])
    with pytest.raises(ValueError, match="layer w has different shapes in the adapters"):
        check_same_shapes("w", [one, other])


def test_an_adapter_on_expert_parameters_is_refused_by_the_svd_tools():
    """Its factors hold one rank-r update per expert, not one low-rank matrix."""
    state = small_adapter()[0]
    state.config["target_parameters"] = ["experts.gate_up"]
    with pytest.raises(ValueError, match=r"the adapter targets parameters \(target_parameters\)"):
        state.layers()
