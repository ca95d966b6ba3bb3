"""`lorakit demo`: the LoRA notes' experiment on scikit-learn's digits (see lorakit.demo)."""

from __future__ import annotations

import argparse

from lorakit.demo.experiment import DemoSettings, run_demo

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a digit classifier, fine-tune a rank-1 LoRA on its worst digit, report",
        description="Train an oversized MLP on scikit-learn's bundled digits, fine-tune a LoRA adapter on the "
        "digit it gets wrong most, check that switching LoRA off restores it bit for bit, and write "
        "metrics.json, PNG plots and report.html.",
    )
    p.add_argument("--out", default="lorakit-demo", metavar="DIR", help="output directory (default lorakit-demo/)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the split, the initialisation and the batches, 0 to 2**32 - 1 (default 0)",
    )
    p.add_argument("--rank", type=int, default=1, help="LoRA rank r (default 1)")
    p.add_argument("--alpha", type=float, default=1.0, help="LoRA α; the update is scaled by α/r (default 1)")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps for each adapter (default 100)")
    p.add_argument("--quick", action="store_true", help="a shorter run (at most 60 fine-tuning steps), for tests")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    settings = DemoSettings(
        out=args.out, seed=args.seed, rank=args.rank, alpha=args.alpha, steps=args.steps, quick=args.quick
    )
    run_demo(settings)
