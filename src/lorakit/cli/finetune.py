"""`lorakit finetune`: LoRA fine-tuning of a transformers model on a local data file (see lorakit.training).

lorakit finetune --model ./my-model --data train.jsonl --out run/ --steps 500 --save-every 100
torchrun --nproc_per_node 2 -m lorakit finetune ...      # several processes, DDP (or --fsdp)

Every flag, its default and its help come from the fields of `TrainConfig` (lorakit.cli.arguments).
"""

from __future__ import annotations

import argparse

from lorakit.cli.arguments import add_config_flags, config_from_args
from lorakit.training.config import HEADINGS, TrainConfig
from lorakit.training.loop import train

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a transformers model with LoRA on local data",
        description="Fine-tune a Hugging Face transformers model with LoRA on a JSONL, CSV or text file and write "
        "a PEFT-format adapter to --out, with metrics.jsonl, loss.png and (with --save-every) checkpoints that "
        "--resume continues from. Run it under torchrun for several processes.",
    )
    add_config_flags(p, TrainConfig, HEADINGS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    train(config_from_args(TrainConfig, args))
