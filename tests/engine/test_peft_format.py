"""PEFT's file format (lorakit.engine.peft_format): the tensor keys, adapter_config.json's fields both ways, and
what is refused on reading. The first tests check the files `lk.save_adapter` writes."""

import json

import pytest
import torch
from helpers import adapted_net as adapted
from helpers import build_net as build
from safetensors import safe_open
from safetensors.torch import load_file

import lorakit as lk
from lorakit.engine.config import LoraConfig
from lorakit.engine.peft_format import (
    a_key_parts,
    base_weight_key,
    bias_key,
    config_from_peft,
    config_to_peft,
    doubled_rank_config,
    factor_keys,
    is_b_factor_key,
    is_factor_key,
    module_key,
    peft_config_dict,
    wrapper_key,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
P = "base_model.model."


def read_config(directory):
    return json.loads((directory / CONFIG).read_text())


def test_written_config_has_every_peft_field(tmp_path):
    model = adapted(
        r=3,
        alpha=6,
        target_modules=["embed", "conv", "hidden"],
        dropout=0.05,
        bias="lora_only",
        use_rslora=True,
        rank_pattern={"hidden": 5},
        alpha_pattern={"conv": 2},
        modules_to_save=["head"],
        task_type="FEATURE_EXTRACTION",
    )
    lk.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="x")
    config = read_config(tmp_path / "adapter")
    assert config["peft_type"] == "LORA"
    assert config["r"] == 3
    assert config["lora_alpha"] == 6
    assert config["target_modules"] == ["conv", "embed", "hidden"]
    assert config["lora_dropout"] == 0.05
    assert config["bias"] == "lora_only"
    assert config["use_rslora"] is True
    assert config["init_lora_weights"] is False
    assert config["fan_in_fan_out"] is False
    assert config["rank_pattern"] == {"hidden": 5}
    assert config["alpha_pattern"] == {"conv": 2}
    assert config["modules_to_save"] == ["head"]
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert config["base_model_name_or_path"] == "x"


def test_written_config_defaults(tmp_path):
    model = lk.inject(build(), lk.LoraConfig(r=2, target_modules=["hidden"]))
    lk.save_adapter(model, tmp_path / "adapter")
    config = read_config(tmp_path / "adapter")
    assert config["peft_type"] == "LORA"
    assert config["init_lora_weights"] is True
    assert config["bias"] == "none"
    assert config["use_rslora"] is False
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["modules_to_save"] is None
    assert config["task_type"] is None
    assert config["base_model_name_or_path"] is None


@pytest.mark.parametrize("init, written", [("kaiming", True), ("gaussian", "gaussian"), (False, False)])
def test_written_init_lora_weights_follows_peft(tmp_path, init, written):
    model = lk.inject(build(), lk.LoraConfig(r=2, target_modules=["hidden"], init=init))
    lk.save_adapter(model, tmp_path / "adapter")
    assert read_config(tmp_path / "adapter")["init_lora_weights"] == written


def test_tensor_keys_follow_peft_and_leave_out_the_adapter_name(tmp_path):
    model = adapted("my_adapter", target_modules=["embed", "conv", "hidden", "head"])
    lk.save_adapter(model, tmp_path / "adapter", adapter="my_adapter")
    tensors = load_file(tmp_path / "adapter" / WEIGHTS)
    assert set(tensors) == {
        f"{P}embed.lora_embedding_A",
        f"{P}embed.lora_embedding_B",
        f"{P}conv.lora_A.weight",
        f"{P}conv.lora_B.weight",
        f"{P}hidden.lora_A.weight",
        f"{P}hidden.lora_B.weight",
        f"{P}head.lora_A.weight",
        f"{P}head.lora_B.weight",
    }
    assert not any("my_adapter" in key for key in tensors)
    # PEFT's shapes: A (r, in), B (out, r); embedding A (r, num), B (dim, r); conv B a 1×1 kernel
    assert tensors[f"{P}embed.lora_embedding_A"].shape == (2, 20)
    assert tensors[f"{P}embed.lora_embedding_B"].shape == (8, 2)
    assert tensors[f"{P}conv.lora_A.weight"].shape == (2, 1, 3, 3)
    assert tensors[f"{P}conv.lora_B.weight"].shape == (4, 2, 1, 1)
    assert tensors[f"{P}hidden.lora_A.weight"].shape == (2, 8)
    assert tensors[f"{P}hidden.lora_B.weight"].shape == (16, 2)
    for key, value in lk.lora_state_dict(model, "my_adapter").items():
        assert torch.equal(tensors[key], value), key
    with safe_open(tmp_path / "adapter" / WEIGHTS, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG, WEIGHTS]


def test_key_builders_name_each_tensor_as_peft_does():
    assert module_key("model.head") == "base_model.model.model.head"
    assert module_key("head", "weight") == "base_model.model.head.weight"
    assert factor_keys("layers.0.q", "linear") == (f"{P}layers.0.q.lora_A.weight", f"{P}layers.0.q.lora_B.weight")
    assert factor_keys("embed", "embedding") == (f"{P}embed.lora_embedding_A", f"{P}embed.lora_embedding_B")
    assert bias_key("hidden", wrapped=True) == f"{P}hidden.base_layer.bias"
    assert bias_key("head", wrapped=False) == f"{P}head.bias"
    assert base_weight_key("model.embed_tokens") == f"{P}model.embed_tokens.base_layer.weight"
    assert wrapper_key("classifier", "modules_to_save", "bias") == f"{P}classifier.modules_to_save.bias"


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_an_a_key_reads_back_as_the_layer_kind_path_and_b_key_it_was_built_from(kind):
    a_key, b_key = factor_keys("model.layers.0.q", kind)
    assert a_key_parts(a_key) == (kind, "model.layers.0.q", b_key)
    assert a_key_parts(b_key) is None
    assert is_factor_key(a_key) and is_factor_key(b_key)
    assert is_b_factor_key(b_key) and not is_b_factor_key(a_key)
    for other in (bias_key("q", wrapped=True), module_key("head", "weight"), base_weight_key("embed")):
        assert a_key_parts(other) is None and not is_factor_key(other)


def test_a_config_written_for_peft_reads_back_as_the_same_config():
    config = LoraConfig(
        r=3,
        alpha=6,
        target_modules=["q", "v"],
        dropout=0.1,
        init="gaussian",
        use_rslora=True,
        bias="lora_only",
        rank_pattern={"v": 5},
        alpha_pattern={"q": 2.0},
        modules_to_save=["head"],
        task_type="CAUSAL_LM",
    )
    raw = config_to_peft(config, ["q", "v"], fan_in_fan_out=False, base_model_name_or_path="base")
    assert (raw["peft_type"], raw["lora_alpha"], raw["lora_dropout"], raw["init_lora_weights"]) == (
        "LORA",
        6,
        0.1,
        "gaussian",
    )
    assert config_from_peft(json.loads(json.dumps(raw))) == config


def test_a_config_without_optional_fields_takes_peft_defaults():
    config = config_from_peft({"target_modules": ["q"], "lora_dropout": None})
    assert (config.r, config.alpha, config.dropout, config.init, config.bias) == (8, 8, 0.0, "kaiming", "none")
    assert not config.use_rslora and config.rank_pattern == {} and config.modules_to_save is None


def test_options_peft_writes_at_their_neutral_values_are_accepted():
    raw = {"target_modules": ["q"], "use_dora": False, "layers_to_transform": None, "trainable_token_indices": []}
    assert config_from_peft({**raw, "init_lora_weights": "olora"}).init == "olora"  # re-run on load, as PEFT does


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "IA3"}, "peft_type is 'IA3'; lorakit reads LoRA adapters only"),
        ({"use_qalora": True}, "use_qalora=True is not supported by lorakit"),
        ({"layers_to_transform": [0, 1]}, "layers_to_transform=[0, 1] is not supported by lorakit"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq' is not supported by lorakit"),
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"bias": "some"}, "bias must be one of"),
    ],
)
def test_a_config_lorakit_cannot_honour_is_refused_naming_the_file(changes, message):
    with pytest.raises(ValueError) as error:
        config_from_peft({"target_modules": ["q"], **changes}, where="run/adapter_config.json")
    assert str(error.value).startswith("run/adapter_config.json: ") and message in str(error.value)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_the_doubled_rank_config_keeps_every_layers_scale(use_rslora):
    config = peft_config_dict(
        task_type=None,
        base_model_name_or_path=None,
        r=4,
        lora_alpha=8,
        target_modules=["q", "v", "o"],
        use_rslora=use_rslora,
        init_lora_weights="pissa",
        rank_pattern={"v": 2},
        alpha_pattern={"o": 3},
    )
    doubled = doubled_rank_config(config)
    assert (doubled["r"], doubled["rank_pattern"], doubled["init_lora_weights"]) == (8, {"v": 4}, True)
    before, after = config_from_peft(config), config_from_peft(doubled)
    for path in ("q", "v", "o"):
        assert after.rank_for(path) == 2 * before.rank_for(path)
        assert after.scale_for(path) == pytest.approx(before.scale_for(path))
