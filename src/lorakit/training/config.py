"""What a fine-tuning run is asked to do: `TrainConfig`, and what it reports back: `TrainResult`.

Each field of TrainConfig is also a flag of `lorakit finetune`: its metadata holds the flag's name and help,
from which the command line is built (lorakit.cli.arguments), so that the defaults are stated once, here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from lorakit.engine.config import targets_from_text
from lorakit.options import flag_of, option
from lorakit.training.chat import FORMATS, LOSS_ON
from lorakit.training.data import Task

__all__ = ["HEADINGS", "TASKS", "TrainConfig", "TrainResult"]

TASKS = get_args(Task)  # ("causal-lm", "seq-cls")


DATA, LORA, OPTIMIZATION, OUTPUT = "model and data", "LoRA", "optimization", "output and processes"
HEADINGS = (DATA, LORA, OPTIMIZATION, OUTPUT)  # the order of `lorakit finetune --help`


@dataclass
class TrainConfig:
    """Everything `lk.train` needs: each field is also a flag of `lorakit finetune` (see its --help).

    Paths are local directories or files (`model` may also be a hub id). One optimizer step takes
    `grad_accum` micro-batches of `batch_size` examples on each process.
    """

    model: str = option(help="a transformers model directory (or hub name)", metavar="PATH", group=DATA)
    data: str = option(help="training data: .jsonl, .csv or plain text", metavar="FILE", group=DATA)
    out: str = option(help="where the adapter, logs and checkpoints go", metavar="DIR", group=OUTPUT)
    task: Task = option(
        "causal-lm",
        "causal-lm: learn to continue each text; seq-cls: learn each text's label",
        choices=get_args(Task),
        group=DATA,
    )
    text_field: str = option("text", "the text field of JSONL/CSV rows", metavar="NAME", group=DATA)
    label_field: str = option("label", "the label field (seq-cls)", metavar="NAME", group=DATA)
    format: str = option(
        "auto",
        "the rows' format (causal-lm): text, prompt-completion, messages, alpaca or sharegpt; auto detects it from "
        "the first row's fields",
        choices=FORMATS,
        group=DATA,
    )
    chat_template: str | None = option(
        None,
        "a Jinja chat template file, for messages data on a tokenizer that has none (or to replace its own)",
        metavar="FILE",
        group=DATA,
        default_text="the tokenizer's",
    )
    loss_on: str = option(
        "completion",
        "completion: train on the completion / every assistant turn only; all: on every token",
        choices=LOSS_ON,
        group=DATA,
    )
    targets: str | list[str] = option(
        "all-linear",
        "'all-linear', a comma-separated list of module names, or a regex",
        metavar="NAMES",
        group=LORA,
        parse=targets_from_text,
    )
    # --rank first: torchrun's own parser takes "--r" for an abbreviation of its --rdzv-* options
    r: int = option(8, "rank r of the adapter", flags=("--rank", "--r"), group=LORA)
    alpha: float = option(16.0, "α; the update is scaled by α/r", group=LORA)
    dropout: float = option(0.05, "dropout on the adapter's input", group=LORA)
    lr: float = option(2e-4, "AdamW learning rate of A", group=OPTIMIZATION)
    lr_ratio: float = option(
        1.0, "LoRA+: B's learning rate is lr × this (the LoRA+ paper suggests 16)", group=OPTIMIZATION
    )
    weight_decay: float = option(0.0, "AdamW weight decay", group=OPTIMIZATION)
    warmup_ratio: float = option(
        0.03, "fraction of steps of linear warm-up before the linear decay", group=OPTIMIZATION
    )
    epochs: int = option(1, "passes over the data", group=OPTIMIZATION, exclusive="length")
    steps: int | None = option(
        None,
        "optimizer steps, instead of --epochs",
        type=int,
        group=OPTIMIZATION,
        exclusive="length",
        default_text="none: --epochs decides",
    )
    batch_size: int = option(8, "examples per micro-batch and process", group=OPTIMIZATION)
    grad_accum: int = option(1, "micro-batches per optimizer step", group=OPTIMIZATION)
    max_length: int = option(
        256, "cut examples to N tokens, or to the model's own limit where that is smaller", metavar="N", group=DATA
    )
    packing: bool = option(
        False,
        "causal-lm: pack several examples into each row of --max-length tokens (attention and positions stay "
        "within each example)",
        group=DATA,
    )
    eval_data: str | None = option(
        None,
        "evaluation data in the same format (eval loss and perplexity, or accuracy)",
        metavar="FILE",
        group=DATA,
        default_text="none",
    )
    eval_every: int = option(
        0, "evaluate on --eval-data every N steps (0: before and after training only)", metavar="N", group=DATA
    )
    save_every: int = option(
        0,
        "write an atomic checkpoint every N steps and after the last (0: only the final adapter)",
        metavar="N",
        group=OUTPUT,
    )
    keep_checkpoints: int = option(2, "keep the newest K checkpoints", metavar="K", group=OUTPUT)
    resume: bool = option(
        False,
        "continue from the newest checkpoint in --out; without it, an --out that holds checkpoints is refused",
        group=OUTPUT,
    )
    seed: int = option(0, "seed for initialisation, data order and dropout", group=OPTIMIZATION)
    fsdp: bool = option(
        False, "under torchrun: shard the frozen base model with FSDP2 instead of replicating it", group=OUTPUT
    )
    progress: bool = option(True, "no progress bar", group=OUTPUT)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name, allowed in (("format", FORMATS), ("loss_on", LOSS_ON)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{flag_of(self, name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.task == "seq-cls" and (self.packing or self.format not in ("auto", "text") or self.chat_template):
            raise ValueError("--packing, --format and --chat-template are for --task causal-lm")

        def whole(v: Any) -> bool:
            return isinstance(v, int)

        checks = [
            ("r", lambda v: whole(v) and v > 0, "a positive integer"),
            ("alpha", math.isfinite, "a finite number"),
            ("lr", lambda v: 0 < v < math.inf, "a positive number"),
            ("lr_ratio", lambda v: 0 < v < math.inf, "a positive number"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
            ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("epochs", lambda v: whole(v) and v > 0, "a positive integer"),
            ("batch_size", lambda v: whole(v) and v > 0, "a positive integer"),
            ("grad_accum", lambda v: whole(v) and v > 0, "a positive integer"),
            ("max_length", lambda v: whole(v) and v >= 2, "an integer of at least 2"),
            ("save_every", lambda v: whole(v) and v >= 0, "an integer >= 0"),
            ("eval_every", lambda v: whole(v) and v >= 0, "an integer >= 0"),
            ("keep_checkpoints", lambda v: whole(v) and v > 0, "a positive integer"),
            ("seed", lambda v: whole(v) and v >= 0, "an integer >= 0"),
        ]
        if self.steps is not None:
            checks.append(("steps", lambda v: whole(v) and v > 0, "a positive integer"))
        for name, ok, what in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ValueError(f"{flag_of(self, name)} must be {what}, got {value!r}")


@dataclass
class TrainResult:
    """What `lk.train` returns.

    Attributes:
        out: the run's directory (the adapter, metrics.jsonl, loss.png, checkpoints).
        steps: the run's total optimizer steps.
        final_loss: the last step's training loss; None when no step ran (a resume of a finished run), not
            finite if the run diverged.
        eval: the final eval metrics ({} without eval data): eval_loss, and eval_accuracy for seq-cls.
        seconds: the wall-clock time of the run.
    """

    out: Path
    steps: int
    final_loss: float | None
    eval: dict[str, float]
    seconds: float
