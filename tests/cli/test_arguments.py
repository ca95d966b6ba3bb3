"""Flags built from config dataclasses (lorakit.cli.arguments): each default stated once, on the config."""

import argparse
import dataclasses

import pytest

from lorakit.cli.arguments import add_config_flags, config_from_args
from lorakit.demo.settings import DemoSettings
from lorakit.options import flag_of
from lorakit.training.config import HEADINGS, TrainConfig


def parser_for(config_class, headings=()):
    parser = argparse.ArgumentParser(prog="x")
    add_config_flags(parser, config_class, headings)
    return parser


REQUIRED = ["--model", "m", "--data", "d.jsonl", "--out", "o"]


def test_finetune_flags_without_values_give_the_train_configs_own_defaults():
    config = config_from_args(TrainConfig, parser_for(TrainConfig, HEADINGS).parse_args(REQUIRED))
    assert config == TrainConfig(model="m", data="d.jsonl", out="o", targets="all-linear")


@pytest.mark.parametrize("config_class", [TrainConfig, DemoSettings])
def test_help_states_every_default_of_every_flag_with_a_value(config_class, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse breaks lines after hyphens ("causal-| lm")
    text = " ".join(parser_for(config_class).format_help().split())
    for field in dataclasses.fields(config_class):
        option = field.metadata.get("option")
        if option is None or field.default is dataclasses.MISSING or isinstance(field.default, bool):
            continue
        shown = option["default_text"] or (f"{field.default:g}" if isinstance(field.default, float) else field.default)
        assert f"(default: {shown})" in text, field.name


def test_flag_values_reach_the_config_through_each_fields_parse():
    args = parser_for(TrainConfig).parse_args([*REQUIRED, "--rank", "4", "--targets", "q_proj,v_proj", "--no-progress"])
    config = config_from_args(TrainConfig, args)
    assert (config.r, config.targets, config.progress) == (4, ["q_proj", "v_proj"], False)


def test_epochs_and_steps_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parser_for(TrainConfig).parse_args([*REQUIRED, "--epochs", "2", "--steps", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_configs_own_check_names_the_flag_the_user_typed():
    assert flag_of(TrainConfig, "r") == "--rank" and flag_of(TrainConfig, "progress") == "--no-progress"
    with pytest.raises(ValueError, match="--rank must be a positive integer"):
        TrainConfig(model="m", data="d", out="o", r=0)
