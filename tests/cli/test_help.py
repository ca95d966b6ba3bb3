"""What `lorakit --help` and each command's --help show (lorakit.cli): the parser is built without torch,
transformers or matplotlib, every flag that takes a value states its default, and usage lines read as typed."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli import build_parser
from lorakit.options import flag_of
from lorakit.training.config import TrainConfig

HEAVY = ("torch", "transformers", "matplotlib")


def commands() -> dict[str, argparse.ArgumentParser]:
    """{name: parser} of every `lorakit` command."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_building_the_parser_imports_no_torch_transformers_or_matplotlib():
    script = (
        "import sys, lorakit.cli\n"
        "lorakit.cli.build_parser()\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("entry", ["script", "module"])
def test_lorakit_help_lists_every_command_from_the_script_and_the_module(entry):
    command = [str(Path(sys.executable).parent / "lorakit")] if entry == "script" else [sys.executable, "-m", "lorakit"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lorakit")
    assert all(name in result.stdout for name in commands())


def no_default_flags() -> set[str]:
    """The flags of `finetune` with no default, required unless --resume takes them from the run (TrainConfig)."""
    return {flag_of(TrainConfig, f.name) for f in dataclasses.fields(TrainConfig) if f.default is dataclasses.MISSING}


def test_every_optional_flag_that_takes_a_value_states_its_default():
    unstated = []
    for name, parser in commands().items():
        chosen = {a for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
        for action in parser._actions:
            flag = action.option_strings[0] if action.option_strings else None
            if flag is None or action.nargs == 0 or action.required or action in chosen or action.help is None:
                continue  # positional, a switch, required, or one of a group of which one is required
            if name == "finetune" and flag in no_default_flags():
                continue
            if "(default: " not in action.help:
                unstated.append(f"{name} {flag}")
    assert unstated == []


@pytest.mark.parametrize(
    "command, usage",
    [
        ("extract", "usage: lorakit extract [-h] BASE TUNED (--rank R | --energy F) [--targets NAMES] --out DIR"),
        ("resize", "usage: lorakit resize [-h] DIR (--rank R | --energy F) --out DIR2"),
        (
            "combine",
            "usage: lorakit combine [-h] DIR DIR [DIR ...] [--weights W [W ...]] [--method {svd,cat,linear}] "
            "[--rank R] --out DIR2",
        ),
    ],
)
def test_usage_puts_the_directories_first_not_after_the_value_of_out(command, usage):
    parser = commands()[command]
    assert " ".join(parser.format_usage().split()) == usage  # argparse's own: "--out DIR2 DIR", one --out value?
    for action in parser._actions:  # the usage written out names every argument the parser has
        assert (action.option_strings[0] if action.option_strings else action.metavar) in usage


def test_combine_says_where_its_weights_are_given_that_they_make_a_sum_not_an_average():
    weights = next(a for a in commands()["combine"]._actions if "--weights" in a.option_strings)
    assert "the sum Σ wᵢ ΔWᵢ, not an average" in weights.help
