"""`lk.extract` (lorakit.tools.extract): a planted rank-k weight change comes back to float precision, at a given
rank or the rank an energy fraction picks per layer; unchanged layers are skipped and `targets` honoured; the
adapter loads in PEFT and in lorakit with the tuned model's logits. (From model directories, shards and files,
through the command: tests/cli/test_svd.py.)"""

import json

import pytest
import torch
from helpers import (
    PLANTED,
    PREFIX,
    assert_loads_with_logits,
    base_state,
    build_tiny_llama,
    layer_deltas,
    logits,
    plant,
    relative,
    tuned_model,
)

import lorakit as lk

W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


def test_extract_recovers_a_planted_rank_k_delta_to_float_precision():
    base = base_state()
    tuned, deltas = plant(base, PLANTED)
    state = lk.extract(base, tuned, r=max(PLANTED.values()))
    report = state.report["layers"]
    assert set(report) == {key.removesuffix(".weight") for key in PLANTED}
    found = layer_deltas(state)
    for key in PLANTED:
        path = key.removesuffix(".weight")
        assert report[path]["relative_error"] < 1e-5
        assert report[path]["rank"] == 5
        assert report[path]["shape"] == list(base[key].shape)
        assert report[path]["energy_kept"] == pytest.approx(1.0, abs=1e-9)
        assert relative(found[path], deltas[key]) < 1e-5


def test_extract_with_an_energy_fraction_picks_exactly_the_planted_rank_per_layer():
    base = base_state()
    tuned, deltas = plant(base, PLANTED)
    state = lk.extract(base, tuned, energy=0.999999)
    found = layer_deltas(state)
    for key, k in PLANTED.items():
        path = key.removesuffix(".weight")
        assert state.report["layers"][path]["rank"] == k
        assert state.tensors[f"{PREFIX}{path}.lora_A.weight"].shape[0] == k
        assert state.report["layers"][path]["relative_error"] < 1e-5
        assert relative(found[path], deltas[key]) < 1e-5


def test_extract_skips_unchanged_layers_and_keeps_only_the_targets():
    base = base_state()
    tuned, _ = plant(base, PLANTED)
    state = lk.extract(base, tuned, r=1)
    assert state.report["unchanged"] == len(base) - len(PLANTED)
    assert set(state.report["layers"]) == {key.removesuffix(".weight") for key in PLANTED}
    assert len(state.tensors) == 2 * len(PLANTED)

    only_q = lk.extract(base, tuned, r=2, targets=["q_proj"])
    assert set(only_q.report["layers"]) == {"model.layers.0.self_attn.q_proj"}
    assert set(only_q.tensors) == {
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight",
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight",
    }
    assert sorted(only_q.report["other_changed"]) == sorted(k for k in PLANTED if "q_proj" not in k)

    layer_1 = lk.extract(base, tuned, r=1, targets=r".*\.layers\.1\..*")  # a regex, as in LoraConfig
    assert set(layer_1.report["layers"]) == {"model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"}


@pytest.mark.parametrize("how", ["rank", "energy"])
def test_extracted_adapter_loads_in_peft_and_lorakit_with_the_tuned_logits(how, tmp_path):
    base = base_state()
    tuned, _ = plant(base, PLANTED)
    expected = logits(tuned_model(tuned))
    assert not torch.allclose(expected, logits(build_tiny_llama()), atol=1e-3)
    state = lk.extract(base, tuned, **({"r": 5} if how == "rank" else {"energy": 0.999999}))
    state.save(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "report.json").read_text())["layers"]
    assert_loads_with_logits(tmp_path / "adapter", build_tiny_llama, expected)


def test_api_refuses_a_rank_larger_than_the_layer_and_mismatched_shapes():
    with pytest.raises(ValueError, match="larger than"):
        lk.extract({"w.weight": W}, {"w.weight": W + 1}, r=7)
    with pytest.raises(ValueError, match="shape"):
        lk.extract({"w.weight": W}, {"w.weight": torch.zeros(6, 8)}, r=1)
    with pytest.raises(ValueError, match="no 2-D floating-point weight differs"):
        lk.extract({"w.weight": W}, {"w.weight": W.clone()}, r=1)


def test_extract_leaves_integer_tensors_alone():
    counts = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    state = lk.extract({"w.weight": W, "c.weight": counts}, {"w.weight": W + 1, "c.weight": counts + 1}, r=1)
    assert state.report["other_changed"] == ["c.weight"] and list(state.report["layers"]) == ["w"]
