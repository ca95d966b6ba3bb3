"""Adapter files (lorakit.engine.adapter_files): `lk.save_adapter` / `lk.load_adapter` in PEFT's format.

Round trips on small plain-torch models (Embedding, Conv2d, Linear), which adapter is saved, trainable flags and
adapter switching after a load, atomic saving, and every kind of bad input: each refused with a clear error, the
model left exactly as it was. (The keys and config fields written: test_peft_format.py.)
"""

import json
import re
import shutil

import pytest
import torch
from helpers import NET_TOKENS as TOKENS
from helpers import adapted_net as adapted
from helpers import build_net as build
from helpers import tree
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
import lorakit.engine.adapter_files
import lorakit.engine.peft_format
from lorakit.engine import model as engine_model
from lorakit.engine.layers import LoraLayer, ModuleCopies
from lorakit.engine.model import active_adapters, lora_layers, module_copies

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
P = "base_model.model."


def train(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        model(TOKENS).square().mean().backward()
        optimizer.step()


def read_config(directory):
    return json.loads((directory / CONFIG).read_text())


def write_config(directory, config):
    (directory / CONFIG).write_text(json.dumps(config))


# -- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"r": 3, "alpha": 5, "rank_pattern": {"hidden": 4, "conv": 1}, "alpha_pattern": {"embed": 7, "hid.*": 2}},
        {"r": 4, "alpha": 6, "use_rslora": True},
        {"use_rslora": True, "rank_pattern": {"conv": 3}, "alpha_pattern": {"conv": 1.5}},
        {"target_modules": ["hidden"], "modules_to_save": ["head"]},
        {"target_modules": r"(embed|head)", "dropout": 0.1},
    ],
    ids=["plain", "patterns", "rslora", "rslora-patterns", "modules_to_save", "regex-targets-dropout"],
)
def test_save_then_load_into_a_fresh_base_gives_identical_outputs(tmp_path, config):
    model = adapted(**config).eval()
    train(model)
    expected = model(TOKENS)
    with lk.disabled(model):
        assert not torch.allclose(model(TOKENS), expected)  # the adapter does change the outputs

    lk.save_adapter(model, tmp_path / "adapter")
    fresh = lk.load_adapter(build(), tmp_path / "adapter").eval()
    # the loaded adapter is frozen, so its linears may take the inference path's other association of the same
    # product: equal up to float32 rounding (rslora's outputs here reach 1e23, hence relative)
    torch.testing.assert_close(fresh(TOKENS), expected, atol=1e-6, rtol=1e-6)
    for path, layer in lora_layers(model):
        loaded = fresh.get_submodule(path)
        assert type(loaded) is type(layer)
        assert loaded.rank("default") == layer.rank("default")
        assert loaded.scale["default"] == pytest.approx(layer.scale["default"])
        assert torch.equal(loaded.lora_A["default"], layer.lora_A["default"])
        assert torch.equal(loaded.lora_B["default"], layer.lora_B["default"])
    assert {path for path, _ in lora_layers(fresh)} == {path for path, _ in lora_layers(model)}


def test_loading_into_a_model_in_eval_mode_keeps_every_module_in_eval_mode(tmp_path):
    """A model put in eval mode before the load must not get adapter dropout back (non-deterministic outputs)."""
    model = adapted(target_modules=["embed", "hidden", "head"], dropout=0.5, modules_to_save=["conv"]).eval()
    lk.save_adapter(model, tmp_path / "adapter")
    fresh = build().eval()
    lk.load_adapter(fresh, tmp_path / "adapter")
    assert [name for name, m in fresh.named_modules() if m.training] == []
    torch.testing.assert_close(fresh(TOKENS), model(TOKENS), atol=1e-6, rtol=0)


def test_modules_to_save_copy_comes_back_and_the_original_stays_the_base(tmp_path):
    model = adapted(target_modules=["hidden"], modules_to_save=["head"]).eval()
    train(model)
    assert not torch.equal(model.head.copies["default"].weight, build().head.weight)
    lk.save_adapter(model, tmp_path / "adapter")
    fresh = build().eval()
    lk.load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(fresh.head, ModuleCopies)
    assert torch.equal(fresh.head.copies["default"].weight, model.head.copies["default"].weight)
    assert torch.equal(fresh.head.copies["default"].bias, model.head.copies["default"].bias)
    assert torch.equal(fresh.head.original.weight, build().head.weight)


@pytest.mark.parametrize(
    "bias, trained", [("lora_only", {"conv", "hidden"}), ("all", {"conv", "hidden", "head"})], ids=["lora_only", "all"]
)
def test_biases_changed_by_training_come_back(tmp_path, bias, trained):
    base = build()
    model = adapted(target_modules=["conv", "hidden"], bias=bias).eval()
    train(model)
    biases = {
        "conv": model.conv.base.bias,
        "hidden": model.hidden.base.bias,
        "head": model.head.bias,
    }
    for name, b in biases.items():  # training moved exactly the biases the mode names
        assert torch.equal(b, getattr(base, name).bias) == (name not in trained), name
    expected = model(TOKENS)

    lk.save_adapter(model, tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / WEIGHTS))
    assert {f"{P}conv.base_layer.bias", f"{P}hidden.base_layer.bias"} <= keys
    assert (f"{P}head.bias" in keys) == (bias == "all")

    fresh = build().eval()
    lk.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.conv.base.bias, biases["conv"])
    assert torch.equal(fresh.hidden.base.bias, biases["hidden"])
    assert torch.equal(fresh.head.bias, biases["head"])
    torch.testing.assert_close(fresh(TOKENS), expected, atol=1e-6, rtol=0)


def test_only_the_named_adapter_is_saved(tmp_path):
    model = adapted("a", target_modules=["hidden"])
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["embed", "head"], init=False), "b")
    lk.save_adapter(model, tmp_path / "a", adapter="a")
    lk.save_adapter(model, tmp_path / "b", adapter="b")
    assert set(load_file(tmp_path / "a" / WEIGHTS)) == {f"{P}hidden.lora_A.weight", f"{P}hidden.lora_B.weight"}
    assert set(load_file(tmp_path / "b" / WEIGHTS)) == {
        f"{P}embed.lora_embedding_A",
        f"{P}embed.lora_embedding_B",
        f"{P}head.lora_A.weight",
        f"{P}head.lora_B.weight",
    }
    assert read_config(tmp_path / "a")["r"] == 2 and read_config(tmp_path / "b")["r"] == 3


# -- after a load --------------------------------------------------------------------------------------------------


def test_load_with_trainable_false_freezes_the_loaded_parameters(tmp_path):
    lk.save_adapter(adapted(modules_to_save=["head"], bias="lora_only"), tmp_path / "adapter")
    model = lk.load_adapter(build(), tmp_path / "adapter")
    loaded = engine_model.adapter_parameters(model, "default")
    assert len(loaded) == 6 + 2 + 2  # 3 layers' A and B, the head copy's weight and bias, conv and hidden biases
    assert not any(p.requires_grad for p in loaded.values())
    assert lk.parameter_counts(model)[0] == 0


def test_load_with_trainable_true_makes_the_loaded_parameters_trainable(tmp_path):
    lk.save_adapter(adapted(modules_to_save=["head"]), tmp_path / "adapter")
    model = lk.load_adapter(build(), tmp_path / "adapter", trainable=True)
    loaded = engine_model.adapter_parameters(model, "default")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in loaded.values()}
    before = {key: p.detach().clone() for key, p in loaded.items()}
    train(model, steps=2)
    assert all(not torch.equal(p, before[key]) for key, p in loaded.items())


def test_loaded_adapter_becomes_active(tmp_path):
    source = adapted().eval()
    lk.save_adapter(source, tmp_path / "adapter")
    model = adapted("other", seed=7).eval()
    lk.load_adapter(model, tmp_path / "adapter", adapter="loaded")
    assert lk.adapter_names(model) == ["other", "loaded"]
    assert active_adapters(model) == ["loaded"]
    assert all(layer.active_adapters == ["loaded"] for _, layer in lora_layers(model))
    torch.testing.assert_close(model(TOKENS), source(TOKENS), atol=1e-6, rtol=0)


def test_two_loaded_adapters_can_be_switched_with_set_adapter(tmp_path):
    first = adapted(seed=1, target_modules=["embed", "hidden"]).eval()
    second = adapted(seed=2, r=3, target_modules=["hidden", "head"], modules_to_save=["conv"]).eval()
    lk.save_adapter(first, tmp_path / "first")
    lk.save_adapter(second, tmp_path / "second")
    model = build().eval()
    base = model(TOKENS)
    lk.load_adapter(model, tmp_path / "first", adapter="first")
    lk.load_adapter(model, tmp_path / "second", adapter="second")
    assert lk.adapter_names(model) == ["first", "second"]
    expected = {"first": first(TOKENS), "second": second(TOKENS)}
    assert not torch.allclose(expected["first"], expected["second"])
    torch.testing.assert_close(model(TOKENS), expected["second"], atol=1e-6, rtol=0)
    for name in ["first", "second", "first"]:
        lk.set_adapter(model, name)
        torch.testing.assert_close(model(TOKENS), expected[name], atol=1e-6, rtol=0)
    with lk.disabled(model):
        assert torch.equal(model(TOKENS), base)


def test_save_of_a_loaded_adapter_writes_the_same_tensors(tmp_path):
    lk.save_adapter(adapted(rank_pattern={"conv": 3}), tmp_path / "one", base_model_name_or_path="x")
    model = lk.load_adapter(build(), tmp_path / "one", adapter="renamed")
    lk.save_adapter(model, tmp_path / "two", adapter="renamed", base_model_name_or_path="x")
    one, two = load_file(tmp_path / "one" / WEIGHTS), load_file(tmp_path / "two" / WEIGHTS)
    assert set(one) == set(two) and all(torch.equal(one[key], two[key]) for key in one)
    config_one, config_two = read_config(tmp_path / "one"), read_config(tmp_path / "two")
    config_one.pop("init_lora_weights"), config_two.pop("init_lora_weights")
    assert config_one == config_two


# -- atomic saving -------------------------------------------------------------------------------------------------


def test_a_save_that_fails_midway_leaves_the_old_adapter_byte_identical(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    lk.save_adapter(adapted(seed=1), directory)
    old = tree(directory)

    def boom(tensors, filename):
        with open(filename, "wb") as f:  # half a file, then the crash
            f.write(b"\x00" * 16)
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.engine.peft_format, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(adapted(seed=2), directory)
    assert tree(directory) == old
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directory left behind
    monkeypatch.undo()
    model = lk.load_adapter(build().eval(), directory)
    torch.testing.assert_close(model(TOKENS), adapted(seed=1).eval()(TOKENS), atol=1e-6, rtol=0)


def test_a_failed_first_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(tensors, filename):
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.engine.peft_format, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(adapted(), tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_resave_replaces_the_adapter_and_keeps_other_files_in_the_directory(tmp_path):
    directory = tmp_path / "adapter"
    lk.save_adapter(adapted(seed=1), directory)
    (directory / "notes.txt").write_text("lr 1e-4\n")
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "step-10.pt").write_bytes(b"checkpoint")
    newer = adapted(seed=2).eval()
    lk.save_adapter(newer, directory)
    assert (directory / "notes.txt").read_text() == "lr 1e-4\n"
    assert (directory / "checkpoints" / "step-10.pt").read_bytes() == b"checkpoint"
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG, WEIGHTS, "notes.txt", "checkpoints"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    model = lk.load_adapter(build().eval(), directory)
    torch.testing.assert_close(model(TOKENS), newer(TOKENS), atol=1e-6, rtol=0)


def test_a_failed_resave_keeps_other_files_too(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    lk.save_adapter(adapted(seed=1), directory)
    (directory / "notes.txt").write_text("keep me")

    def boom(tensors, filename):
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.engine.peft_format, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(adapted(seed=2), directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG, WEIGHTS, "notes.txt"])
    assert (directory / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# -- bad input: a clear error, and the model exactly as it was -----------------------------------------------------


def snapshot(model):
    """Everything a load could change."""
    return {
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "adapters": lk.adapter_names(model),
        "active": active_adapters(model),
        "layers_active": [(name, list(m.active_adapters)) for name, m in lora_layers(model)],
        "copies_active": [(name, list(m.active_adapters)) for name, m in module_copies(model)],
        "outputs": model(TOKENS).detach(),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert list(after["params"]) == list(before["params"])
    for name, p in after["params"].items():
        assert torch.equal(p, before["params"][name]), name
    assert after["requires_grad"] == before["requires_grad"]
    assert after["adapters"] == before["adapters"]
    if before["adapters"]:  # the previously active adapter is still active (plain models: see the test below)
        assert after["active"] == before["active"]
    assert after["layers_active"] == before["layers_active"]
    assert after["copies_active"] == before["copies_active"]
    assert torch.equal(after["outputs"], before["outputs"])


def plain_model():
    model = build().eval()
    model.hidden.bias.requires_grad_(False)  # a flag a load must not reset
    return model


def model_with_adapters():
    """Adapters "old" (active) and "other", on some of the layers a loaded adapter also targets."""
    model = adapted("old", target_modules=["embed", "hidden"], modules_to_save=["head"]).eval()
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["conv", "hidden"], init=False), "other")
    lk.set_adapter(model, "old")
    model.conv.base.bias.requires_grad_(True)  # an unusual set of flags a load must restore
    model.head.copies["old"].bias.requires_grad_(False)
    return model


@pytest.fixture(params=["plain", "with-adapters"])
def target(request):
    return {"plain": plain_model, "with-adapters": model_with_adapters}[request.param]()


@pytest.fixture
def good(tmp_path):
    """A valid adapter directory for Net: three adapted layers, their trained biases, a module copy."""
    directory = tmp_path / "good"
    model = adapted(bias="lora_only", modules_to_save=["head"])
    lk.save_adapter(model, directory)
    return directory


def _edit_config(**changes):
    def edit(directory):
        write_config(directory, {**read_config(directory), **changes})

    return edit


def _edit_tensors(edit_dict):
    def edit(directory):
        tensors = load_file(directory / WEIGHTS)
        edit_dict(tensors)
        save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})

    return edit


def _set_item(key, value):
    def edit(tensors):
        tensors[key] = value

    return edit


def _poison(key, value):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return edit


def _only_bin(directory):
    tensors = load_file(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    torch.save(tensors, directory / "adapter_model.bin")


def _truncate(directory):
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "missing-directory": (shutil.rmtree, FileNotFoundError, "no adapter directory at"),
    "no-config": (lambda d: (d / CONFIG).unlink(), FileNotFoundError, f"has no {CONFIG}"),
    "invalid-json": (lambda d: (d / CONFIG).write_text('{"r": 2,'), ValueError, "is not valid JSON"),
    "config-not-an-object": (lambda d: (d / CONFIG).write_text("[1, 2]"), ValueError, "must hold a JSON object"),
    "ia3": (_edit_config(peft_type="IA3"), ValueError, "peft_type is 'IA3'; lorakit reads LoRA adapters only"),
    "qalora": (_edit_config(use_qalora=True), ValueError, "use_qalora=True is not supported"),
    "alora": (_edit_config(alora_invocation_tokens=[7]), ValueError, r"alora_invocation_tokens=\[7\] is not supported"),
    "bad-rank": (_edit_config(r=0), ValueError, "r must be a positive integer"),
    "targets-nothing": (_edit_config(target_modules=["q_proj"]), ValueError, "matches no module"),
    "only-bin": (_only_bin, FileNotFoundError, r"adapter_model\.bin is a pickle, which lorakit never loads"),
    "no-weights": (lambda d: (d / WEIGHTS).unlink(), FileNotFoundError, f"has no {WEIGHTS}$"),
    "garbage-safetensors": (
        lambda d: (d / WEIGHTS).write_bytes(b"\xff" * 64),
        ValueError,
        "is not a readable safetensors file",
    ),
    "truncated-safetensors": (_truncate, ValueError, "is not a readable safetensors file"),
    "shape-mismatch": (
        _edit_tensors(_set_item(f"{P}hidden.lora_A.weight", torch.zeros(3, 8))),
        ValueError,
        re.escape(f"shape mismatch for {P}hidden.lora_A.weight: the model expects (2, 8), {WEIGHTS} has (3, 8)"),
    ),
    "extra-key": (
        _edit_tensors(_set_item(f"{P}nowhere.lora_A.weight", torch.zeros(2, 8))),
        ValueError,
        re.escape(f"has 1 tensor(s) no module of the model takes, e.g. '{P}nowhere.lora_A.weight'"),
    ),
    "missing-key": (
        _edit_tensors(lambda t: t.pop(f"{P}conv.lora_B.weight")),
        ValueError,
        re.escape(f"lacks 1 tensor(s) the config asks for, e.g. '{P}conv.lora_B.weight'"),
    ),
    "missing-bias": (
        _edit_tensors(lambda t: t.pop(f"{P}hidden.base_layer.bias")),
        ValueError,
        re.escape(f"lacks 1 tensor(s) the config asks for, e.g. '{P}hidden.base_layer.bias'"),
    ),
    "nan": (
        _edit_tensors(_poison(f"{P}hidden.lora_B.weight", float("nan"))),
        ValueError,
        re.escape(f"{P}hidden.lora_B.weight in {WEIGHTS} holds NaN or inf"),
    ),
    "inf-in-module-copy": (
        _edit_tensors(_poison(f"{P}head.weight", float("inf"))),
        ValueError,
        re.escape(f"{P}head.weight in {WEIGHTS} holds NaN or inf"),
    ),
}


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_clearly_and_leaves_the_model_unchanged(good, target, case, trainable, monkeypatch):
    edit, error, message = BAD_INPUTS[case]
    edit(good)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("lorakit must never unpickle an adapter file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    before = snapshot(target)
    with pytest.raises(error, match=message):
        lk.load_adapter(target, good, adapter="new", trainable=trainable)
    assert_unchanged(target, before)


def test_an_adapter_name_already_in_use_is_refused_and_the_existing_adapter_kept(good):
    model = model_with_adapters()
    before = snapshot(model)
    old = {key: p.detach().clone() for key, p in lk.lora_state_dict(model, "old").items()}
    with pytest.raises(ValueError, match="already has an adapter named 'old'"):
        lk.load_adapter(model, good, adapter="old")
    assert_unchanged(model, before)
    assert lk.adapter_names(model) == ["old", "other"]
    for key, value in lk.lora_state_dict(model, "old").items():
        assert torch.equal(value, old[key]), key


def test_a_second_failed_load_fails_with_its_own_error_and_changes_nothing(tmp_path):
    """A failed load must leave no trace that changes how the next load behaves or fails."""
    lk.save_adapter(adapted(), tmp_path / "nan")
    _edit_tensors(_poison(f"{P}hidden.lora_B.weight", float("nan")))(tmp_path / "nan")
    lk.save_adapter(adapted(), tmp_path / "missing")
    _edit_tensors(lambda t: t.pop(f"{P}conv.lora_B.weight"))(tmp_path / "missing")
    model = plain_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        lk.load_adapter(model, tmp_path / "nan")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=re.escape(f"lacks 1 tensor(s) the config asks for, e.g. '{P}conv.lora_B")):
        lk.load_adapter(model, tmp_path / "missing")
    assert_unchanged(model, before)
    assert active_adapters(model) == []


def test_a_good_load_after_a_failed_one_works(tmp_path):
    source = adapted().eval()
    lk.save_adapter(source, tmp_path / "good")
    lk.save_adapter(source, tmp_path / "bad")
    _edit_tensors(_poison(f"{P}conv.lora_A.weight", float("nan")))(tmp_path / "bad")
    model = build().eval()
    with pytest.raises(ValueError, match="holds NaN or inf"):
        lk.load_adapter(model, tmp_path / "bad")
    lk.load_adapter(model, tmp_path / "good")
    assert lk.adapter_names(model) == ["default"]
    torch.testing.assert_close(model(TOKENS), source(TOKENS), atol=1e-6, rtol=0)


def test_no_lorakit_module_is_left_after_a_failed_load_into_a_plain_model(good):
    _edit_tensors(lambda t: t.pop(f"{P}embed.lora_embedding_B"))(good)
    model = plain_model()
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        lk.load_adapter(model, good)
    assert not any(isinstance(m, LoraLayer | ModuleCopies) for m in model.modules())


def nested_fc():
    """fc, then block.fc, whose path ends in the other's name."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.fc, model.block = nn.Linear(4, 4), nn.Sequential()
    model.block.fc = nn.Linear(4, 4)
    return model


def test_an_adapter_on_a_path_that_ends_another_is_written_to_adapt_it_alone(tmp_path):
    from peft import PeftModel

    base = nested_fc
    model = lk.inject(base(), lk.LoraConfig(r=2, target_modules=r"fc", init=False))  # the top-level fc only
    x = torch.randn(3, 4)
    expected = model(x).detach()
    lk.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == "fc"  # a regex
    assert [path for path, _ in lora_layers(lk.load_adapter(base(), tmp_path / "a"))] == ["fc"]
    torch.testing.assert_close(PeftModel.from_pretrained(base(), tmp_path / "a")(x), expected)


@pytest.mark.parametrize("trainable", [False, True])
def test_a_loaded_adapter_leaves_the_one_in_training_as_it_was_unless_it_trains_itself(tmp_path, trainable):
    lk.save_adapter(adapted("other", seed=2, target_modules=["hidden"]), tmp_path / "other", adapter="other")
    model = adapted("mine")
    mine = list(engine_model.adapter_parameters(model, "mine").values())
    lk.load_adapter(model, tmp_path / "other", adapter="other", trainable=trainable)
    other = list(engine_model.adapter_parameters(model, "other").values())
    assert all(p.requires_grad is not trainable for p in mine)  # as PEFT's load_adapter(is_trainable=...)
    assert all(p.requires_grad is trainable for p in other)
    trains = {id(p) for p in mine + other}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in trains)  # the base stays frozen


def test_bias_all_beside_another_adapters_full_copy_saves_the_original_heads_bias(tmp_path):
    model = adapted("a", target_modules=["hidden"], modules_to_save=["head"])
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["conv"], bias="all", init=False), "b")
    b = engine_model.adapter_parameters(model, "b")
    assert f"{P}head.bias" in b  # with b active, the original head runs: its bias is b's to train
    with torch.no_grad():
        for p in b.values():
            p.add_(0.1)
        expected = model(TOKENS)
    lk.save_adapter(model, tmp_path / "b", adapter="b")
    with torch.no_grad():
        torch.testing.assert_close(lk.load_adapter(build(), tmp_path / "b")(TOKENS), expected)


def test_targets_written_for_a_model_without_the_other_adapters_full_copies(tmp_path):
    model = lk.inject(nested_fc(), lk.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["block"]), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc"], init=False), "b")  # block is a's copy: fc alone
    assert [path for path, layer in lora_layers(model) if "b" in layer.lora_A] == ["fc"]
    x = torch.randn(3, 4)
    expected = model(x).detach()
    lk.save_adapter(model, tmp_path / "b", adapter="b")
    fresh = lk.load_adapter(nested_fc(), tmp_path / "b")  # where "fc" would also pick block.fc
    assert [path for path, _ in lora_layers(fresh)] == ["fc"]
    torch.testing.assert_close(fresh(x), expected)


def test_a_failed_load_into_a_plain_model_leaves_no_lorakit_state_on_it(tmp_path):
    torch.manual_seed(0)
    source = lk.inject(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(r=2, target_modules=["0"]))
    lk.save_adapter(source, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["r"] = 3  # the file's factors have rank 2: the load fails after the adapter was injected
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    plain = nn.Sequential(nn.Linear(4, 4))
    before = dict(plain.__dict__)
    with pytest.raises(ValueError, match="shape mismatch"):
        lk.load_adapter(plain, tmp_path / "adapter")
    assert plain.__dict__.keys() == before.keys()
    assert lk.adapter_names(plain) == []
    assert plain.__dict__.keys() == before.keys()  # a query writes nothing either


def test_an_adapter_records_the_directory_its_base_was_loaded_from_so_transformers_loads_both(tmp_path):
    from helpers import build_tiny_llama, logits
    from transformers import AutoModelForCausalLM

    build_tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init=False))
    expected = logits(model)
    lk.save_adapter(model, tmp_path / "adapter")  # no base_model_name_or_path given: the model's own, as PEFT
    assert json.loads((tmp_path / "adapter" / CONFIG).read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    # transformers' PEFT integration: the adapter directory alone finds the base and loads the adapter onto it
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(build_tiny_llama()), expected, atol=1e-3)  # the adapter is what changed it
