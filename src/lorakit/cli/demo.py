"""`lorakit demo`: the LoRA notes' experiment on scikit-learn's digits (see lorakit.demo).

Every flag, its default and its help come from the fields of `DemoSettings` (lorakit.cli.arguments).
"""

from __future__ import annotations

import argparse

from lorakit.cli.arguments import add_config_flags, config_from_args
from lorakit.demo.settings import DemoSettings

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a digit classifier, fine-tune a rank-1 LoRA on its worst digit, report",
        description="Train an oversized MLP on scikit-learn's bundled digits, fine-tune a LoRA adapter on the "
        "digit it gets wrong most, check that switching LoRA off restores it bit for bit, and write "
        "metrics.json, PNG plots and report.html.",
    )
    add_config_flags(p, DemoSettings)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lorakit.demo.experiment import run_demo

    run_demo(config_from_args(DemoSettings, args))
