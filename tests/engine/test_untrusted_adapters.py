"""Adapter files from outside, and adapters written out, checked in bounded time and memory: a config's ranks and
the file's shapes are compared before anything is allocated, a pattern that backtracks is refused naming its key,
types are PEFT's, every refusal is a ValueError that leaves the model as it was; and no writer writes a factor that
is not finite, not floating point or without its partner, nor folds factors the forward pass would refuse."""

import json

import pytest
import torch
from helpers import adapted_net, build_net, build_tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit.engine.layers import LoraLayer

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def saved(tmp_path, **changes):
    """Net's adapter (r 2 on embed, conv and hidden) saved, with config fields replaced by `changes`."""
    path = tmp_path / "adapter"
    lk.save_adapter(adapted_net(), path)
    config = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**config, **changes}))
    return path


def state(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_refused_and_untouched(path, message, model=None):
    model = model if model is not None else build_net()
    before = state(model)
    with pytest.raises(ValueError, match=message):
        lk.load_adapter(model, path)
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert lk.adapter_names(model) == []


def test_a_config_rank_far_above_the_files_is_refused_before_any_factor_is_made(tmp_path, monkeypatch):
    path = saved(tmp_path, r=1_000_000, lora_alpha=8)

    def no_allocation(*args, **kwargs):
        raise AssertionError("a factor was made before the file's shapes were checked")

    monkeypatch.setattr(LoraLayer, "add_adapter", no_allocation)
    assert_refused_and_untouched(
        path,
        r"shape mismatch for base_model\.model\.embed\.lora_embedding_A: the model "
        r"expects \(1000000, 20\), adapter_model\.safetensors has \(2, 20\)",
    )


def test_a_rank_past_the_memory_available_is_refused_with_the_figure_before_any_factor_is_made(monkeypatch):
    monkeypatch.setattr("lorakit.io.untrusted.available_memory", lambda: 10**9)
    model = build_net()
    before = state(model)
    with pytest.raises(
        ValueError, match=r"adapter 'default' \(r=1000000000\) needs about [0-9.,]+ GB of memory, and 1\.0 GB"
    ):
        lk.inject(model, lk.LoraConfig(r=10**9, target_modules=["hidden"]))
    assert state(model).keys() == before.keys() and lk.adapter_names(model) == []


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
        ({"lora_dropout": "0.1"}, "lora_dropout must be a number or null, got '0.1'"),
        ({"r": True}, "r must be an integer, got True"),
        ({"r": 2.0}, "r must be an integer, got 2.0"),
        ({"target_modules": [1, None]}, r"target_modules must be a list of module names, .* got \[1, None\]"),
        ({"rank_pattern": {"hidden": "2"}}, "rank_pattern must be an object of patterns to integers"),
        ({"r": 10**30}, "r must be at most 2\\*\\*63 - 1, got a number of 31 digits"),
        ({"exclude_modules": "("}, r"exclude_modules: invalid regular expression '\('"),
        ({"alpha_pattern": {"(": 2}}, r"alpha_pattern\['\('\]: invalid regular expression"),
        ({"target_modules": r"(?:.|..)+\d"}, None),  # short names: answered, matches nothing
    ],
    ids=[
        "rslora-text",
        "dropout-text",
        "r-bool",
        "r-float",
        "targets-numbers",
        "pattern-text",
        "r-huge",
        "exclude-regex",
        "alpha-pattern-regex",
        "backtracking-short",
    ],
)
def test_config_values_of_the_wrong_type_or_size_are_refused_naming_the_field(tmp_path, changes, message):
    assert_refused_and_untouched(saved(tmp_path, **changes), message or "matches no module")


def test_alpha_past_the_largest_float_is_refused_not_an_overflow_error(tmp_path):
    path = saved(tmp_path)
    text = (path / CONFIG).read_text().replace('"lora_alpha": 4', '"lora_alpha": 1' + "0" * 400)
    (path / CONFIG).write_text(text)
    assert_refused_and_untouched(path, "a number of 401 digits")  # refused as JSON is read, past 100 digits
    with pytest.raises(ValueError, match="alpha must be a finite number, got a number of 401 digits"):
        lk.LoraConfig(r=2, alpha=10**400, target_modules=["hidden"])  # and from Python: no OverflowError


def test_a_pattern_that_backtracks_on_the_models_names_is_refused_naming_its_key(tmp_path):
    model = build_tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / CONFIG).read_text())
    config["target_modules"] = r"(?:.|..)+\d"
    (tmp_path / "llama" / CONFIG).write_text(json.dumps(config))
    assert_refused_and_untouched(tmp_path / "llama", "target_modules: the regular expression", build_tiny_llama())


def test_a_global_flag_inside_a_rank_pattern_is_read_not_a_traceback(tmp_path):
    path = tmp_path / "adapter"
    lk.save_adapter(adapted_net(rank_pattern={"hidden": 3}), path)
    config = json.loads((path / CONFIG).read_text())
    config["rank_pattern"] = {"(?i)HIDDEN": 3}  # PEFT wraps it as (.*\.)?((?i)HIDDEN)$, which re refuses
    (path / CONFIG).write_text(json.dumps(config))
    model = lk.load_adapter(build_net(), path)
    assert model.hidden.lora_A["default"].shape[0] == 3


@pytest.mark.parametrize(
    "dtype", [torch.float8_e4m3fn, torch.int64, torch.bool, torch.complex64], ids=["float8", "int", "bool", "complex"]
)
def test_factors_of_a_type_lorakit_does_not_compute_in_are_refused_from_the_header(tmp_path, dtype):
    path = saved(tmp_path)
    tensors = load_file(path / WEIGHTS)
    key = "base_model.model.hidden.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape).to(dtype)
    save_file(tensors, path / WEIGHTS)
    assert_refused_and_untouched(path, f"{key} is of type")


def test_a_json_config_nested_too_deeply_is_one_value_error(tmp_path):
    path = saved(tmp_path)
    (path / CONFIG).write_text('{"r": ' + "[" * 100_000)
    assert_refused_and_untouched(path, "nested deeper than 64 levels")


# -- what is written ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda A: A.fill_(float("inf")), "hidden.lora_A.weight holds NaN or inf"),
        (lambda A: A.fill_(float("nan")), "hidden.lora_A.weight holds NaN or inf"),
    ],
    ids=["inf", "nan"],
)
def test_a_non_finite_adapter_is_refused_naming_its_layer_and_nothing_is_written(tmp_path, damage, message):
    model = adapted_net()
    with torch.no_grad():
        damage(model.hidden.lora_A["default"])
    with pytest.raises(ValueError, match=f"not writing the adapter: {message}"):
        lk.save_adapter(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_written_over_another_keeps_the_old_one_when_refused(tmp_path):
    lk.save_adapter(adapted_net(), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    model = adapted_net(seed=2)
    with torch.no_grad():
        model.conv.lora_B["default"].fill_(float("inf"))
    with pytest.raises(ValueError, match=r"conv\.lora_B\.weight holds NaN or inf"):
        lk.save_adapter(model, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"w.lora_A.weight": torch.ones(2, 4)}, "w.lora_A.weight has no w.lora_B.weight beside it"),
        ({"w.lora_A.weight": torch.ones(2, 4, dtype=torch.int32), "w.lora_B.weight": torch.ones(3, 2)}, "int32"),
        ({"w.lora_A.weight": torch.ones(0, 4), "w.lora_B.weight": torch.ones(3, 0)}, "with no elements"),
        ({"w.lora_A.weight": torch.ones(2, 4, dtype=torch.complex64), "w.lora_B.weight": torch.ones(3, 2)}, "complex"),
    ],
    ids=["lone-A", "integer", "zero-rank", "complex"],
)
def test_an_adapter_state_that_is_no_usable_adapter_is_not_written(tmp_path, tensors, message):
    state = lk.AdapterState(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["w"]},
        {f"base_model.model.{k}": t for k, t in tensors.items()},
    )
    with pytest.raises(ValueError, match=message):
        state.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- merging -------------------------------------------------------------------------------------------------------


def test_merge_refuses_factors_on_the_meta_device_and_leaves_the_weight(tmp_path):
    model = adapted_net()
    model.hidden.lora_A["default"] = nn.Parameter(torch.empty(2, 8, device="meta"))
    weight = model.hidden.base.weight.detach().clone()
    for safe in (False, True):
        with pytest.raises(ValueError, match="cannot merge adapter 'default' into hidden: LoRA factors on the meta"):
            lk.merge(model, safe=safe)
    assert torch.equal(model.hidden.base.weight, weight)


def test_merge_refuses_factors_of_two_dtypes_as_the_forward_does():
    model = adapted_net(target_modules=["hidden"])
    model.hidden.lora_B["default"] = nn.Parameter(model.hidden.lora_B["default"].detach().double())
    with pytest.raises(RuntimeError):  # the forward pass: mat1 and mat2 must have the same dtype
        model.hidden(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"its factors are torch\.float32 and torch\.float64"):
        lk.merge(model)
