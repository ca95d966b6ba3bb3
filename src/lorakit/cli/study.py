"""`lorakit study`: intrinsic dimension, LoRA ranks, subspace similarity, amplification and truncation, measured
on one fine-tuning (see lorakit.study.experiment).

lorakit study [--out DIR] [--quick]                                     # the demo's digit classifier
lorakit study --model DIR --data train.jsonl --eval-data dev.jsonl      # a transformers classifier

Every flag, its default and its help come from the fields of `StudySettings` (lorakit.cli.arguments).
"""

from __future__ import annotations

import argparse

from lorakit.cli.arguments import add_config_flags, config_from_args
from lorakit.study.settings import DATA, OUTPUT, StudySettings

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="measure how many parameters a fine-tuning needs: intrinsic dimension, LoRA ranks, truncation",
        description="Fine-tune a model in full, with LoRA at ranks 1 to 64 and in random subspaces of dimension d "
        "(DID and SAID, Fastfood projections), find d90, compare the adapters' directions and amplification, "
        "truncate the weights to rank k, and write study.json, PNG plots and report.html. Without --model: the "
        "demo's digit classifier, fine-tuned on transposed digits. Finished runs are kept in --out: the same "
        "command resumes an interrupted study.",
    )
    add_config_flags(p, StudySettings, (DATA, OUTPUT))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from lorakit.study.experiment import run_study

    run_study(config_from_args(StudySettings, args))
