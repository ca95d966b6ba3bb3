"""TrainConfig (lorakit.training.config): every value is checked when the config is made, and a refusal names
the flag of `lorakit finetune` that sets it, so that an error reads the same from Python and the command line."""

import math
import re

import pytest

import lorakit as lk


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 1.5, "--epochs must be a positive integer, got 1.5"),
        ("steps", 2.5, "--steps must be a positive integer, got 2.5"),
        ("max_length", 8.5, "--max-length must be an integer of at least 2, got 8.5"),
        ("save_every", 1.5, "--save-every must be an integer >= 0, got 1.5"),
        ("seed", 1.5, "--seed must be an integer in [0, 2**32), got 1.5"),
        ("lr", "1e-3", "--lr must be a positive number, got '1e-3'"),
        ("dropout", None, "--dropout must be in [0, 1), got None"),
    ],
)
def test_train_config_refuses_values_of_the_wrong_kind_by_flag(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lk.TrainConfig(model="m", data="d", out="o", **{field: value})


def test_the_required_fields_alone_make_a_valid_config():
    config = lk.TrainConfig(model="m", data="d", out="o")
    assert (config.model, config.data, config.out, config.steps) == ("m", "d", "o", None)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", 0, "--rank must be a positive integer, got 0"),
        ("alpha", math.inf, "--alpha must be a finite number, got inf"),
        ("lr", 0.0, "--lr must be a positive number, got 0.0"),
        ("lr_ratio", -1.0, "--lr-ratio must be a positive number, got -1.0"),
        ("weight_decay", -0.1, "--weight-decay must be a number >= 0, got -0.1"),
        ("warmup_ratio", 1.0, "--warmup-ratio must be in [0, 1), got 1.0"),
        ("dropout", 1.0, "--dropout must be in [0, 1), got 1.0"),
        ("batch_size", 0, "--batch-size must be a positive integer, got 0"),
        ("grad_accum", True, "--grad-accum must be a positive integer, got True"),  # a bool is no count
        ("max_length", 1, "--max-length must be an integer of at least 2, got 1"),
        ("keep_checkpoints", 0, "--keep-checkpoints must be a positive integer, got 0"),
        ("steps", 0, "--steps must be a positive integer, got 0"),
        ("task", "translation", "--task must be one of causal-lm, seq-cls, got 'translation'"),
    ],
)
def test_a_value_out_of_range_is_refused_by_its_flag(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        lk.TrainConfig(model="m", data="d", out="o", **{field: value})


def test_the_default_learning_rate_is_the_tasks_own_and_help_says_which():
    import argparse

    from lorakit.cli.arguments import add_config_flags
    from lorakit.training.config import DEFAULT_LR, TrainConfig

    assert lk.TrainConfig(model="m", data="d", out="o").lr == DEFAULT_LR["causal-lm"] == 2e-4
    assert lk.TrainConfig(model="m", data="d", out="o", task="seq-cls").lr == DEFAULT_LR["seq-cls"] == 1e-3
    assert lk.TrainConfig(model="m", data="d", out="o", task="seq-cls", lr=5e-4).lr == 5e-4  # given: taken
    parser = argparse.ArgumentParser(prog="x", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=1000))
    add_config_flags(parser, TrainConfig)
    assert "AdamW learning rate of A (default: 0.0002 for causal-lm, 0.001 for seq-cls)" in parser.format_help()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("init", "svd", "--init must be one of kaiming, gaussian, pissa, pissa_niter_K, milora, olora, got 'svd'"),
        ("dtype", "float64", "--dtype must be one of float32, bfloat16, float16, got 'float64'"),
        ("modules_to_save", "lm_head", "--modules-to-save must be a list of module names, got 'lm_head'"),
    ],
)
def test_the_engines_options_are_checked_by_their_flags(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        lk.TrainConfig(model="m", data="d", out="o", **{field: value})
