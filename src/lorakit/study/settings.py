"""What `lorakit study` is asked to run: `StudySettings`, whose fields are also the command's flags.

Apart from the study itself (lorakit.study.experiment) so that the command line is built without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.engine.config import targets_from_text
from lorakit.options import option

__all__ = ["DATA", "OUTPUT", "StudySettings"]

DATA, OUTPUT = "model and data", "study"


def _targets(text: str) -> list[str] | str:
    return "all" if text.strip() == "all" else targets_from_text(text)


@dataclass
class StudySettings:
    """What `lorakit study` runs: each field is also one of its flags (see its --help)."""

    model: str | None = option(
        None,
        "a transformers model directory, studied as a sequence classifier",
        metavar="DIR",
        group=DATA,
        default_text="the demo's digit classifier, fine-tuned on transposed digits",
    )
    data: str | None = option(
        None, "labelled training data, .jsonl or .csv (with --model)", metavar="FILE", group=DATA, default_text="none"
    )
    eval_data: str | None = option(
        None,
        "labelled held-out data on which every metric is measured (with --model)",
        metavar="FILE",
        group=DATA,
        default_text="none",
    )
    task: str = option("seq-cls", "what --model learns: seq-cls, each text's label", choices=("seq-cls",), group=DATA)
    text_field: str = option("text", "the text field of the data's rows", metavar="NAME", group=DATA)
    label_field: str = option("label", "the label field of the data's rows", metavar="NAME", group=DATA)
    targets: str | list[str] = option(
        "all",
        "the parameters fine-tuned: all, or the modules LoRA would take: all-linear, comma-separated names, or a "
        "regex (a classifier's new head always trains)",
        metavar="NAMES",
        group=OUTPUT,
        parse=_targets,
    )
    out: Path = option(
        Path("lorakit-study"),
        "output directory: study.json, plots, report.html; a study there with the same settings resumes",
        metavar="DIR",
        group=OUTPUT,
    )
    seed: int = option(0, "seed of the split, initialisations, projections and batches, 0 to 2**32 - 1", group=OUTPUT)
    steps: int | None = option(
        None,
        "optimizer steps of every training run",
        type=int,
        group=OUTPUT,
        default_text="300 for the digits, 100 for a model; 60 and 40 with --quick",
    )
    quick: bool = option(
        False,
        "a smaller study: fewer steps, ranks 1, 8 and 64, d on a grid ×16 apart without bisection (for tests)",
        group=OUTPUT,
    )

    def __post_init__(self) -> None:
        if not str(self.out).strip():  # Path("") is ".": the files would land wherever the command runs
            raise ValueError("--out must not be empty")
        self.out = Path(self.out)
        if self.model is None and (self.data or self.eval_data):
            raise ValueError("--data and --eval-data go with --model (without it the study uses the digits)")
        if self.model is not None and not (self.data and self.eval_data):
            raise ValueError("--model needs --data and --eval-data: labelled training and held-out files")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not 0 <= self.seed < 2**32:  # scikit-learn's split takes no other seed
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
