"""`lorakit finetune`: LoRA fine-tuning of a transformers model on a local data file (see lorakit.training).

lorakit finetune --model ./my-model --data train.jsonl --out run/ --steps 500 --save-every 100
lorakit finetune --resume --out run/ [--steps 800]       # the run's own settings, and the changes given
torchrun --nproc_per_node 2 -m lorakit finetune ...      # several processes, DDP (or --fsdp)

Every flag, its default and its help come from the fields of `TrainConfig` (lorakit.cli.arguments).
"""

from __future__ import annotations

import argparse
from typing import Any

from lorakit.cli.arguments import add_config_flags, config_from_args, given_values
from lorakit.training.config import CONFIG_NAME, HEADINGS, TrainConfig, saved_config

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a transformers model with LoRA on local data",
        description="Fine-tune a Hugging Face transformers model with LoRA on a JSONL, CSV or text file and write "
        "a PEFT-format adapter to --out, with metrics.jsonl, loss.png and (with --save-every) checkpoints that "
        "--resume continues from. Run it under torchrun for several processes. --model and --data are "
        "required, except with --resume, which takes every setting from the run in --out (" + CONFIG_NAME + "), "
        "the flags given beside it changing them.",
    )
    add_config_flags(p, TrainConfig, HEADINGS, required=False)  # --resume --out DIR needs no --model or --data
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lorakit.training.loop import train

    train(config_from_args(TrainConfig, args, run_settings(given_values(TrainConfig, args))))


def run_settings(given: dict[str, Any]) -> dict[str, Any] | None:
    """With --resume, the settings of the run in --out, which the flags given replace one by one; None for a new
    run, or a --resume into an --out that holds no run yet (then --model and --data are needed as for a new one)."""
    if not given.get("resume") or "out" not in given:
        return None
    try:
        saved = saved_config(given["out"])
    except FileNotFoundError:
        if {"model", "data"} <= given.keys():
            return None  # a run killed before it began, or a first start with --resume: it starts from step 0
        raise ValueError(
            f"--resume: {given['out']} holds no run ({CONFIG_NAME}) to take the settings from: give --model and --data"
        ) from None
    if "epochs" in given:  # --epochs and --steps exclude each other: the length given replaces the saved one
        saved["steps"] = None
    return saved
