"""What a fine-tuning run is asked to do: `TrainConfig`, and what it reports back: `TrainResult`.

Each field of TrainConfig is also a flag of `lorakit finetune`: its metadata holds the flag's name and help,
from which the command line is built (lorakit.cli.finetune), so that the defaults are stated once, here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from lorakit.training.data import Task

__all__ = ["TASKS", "TrainConfig", "TrainResult"]

TASKS = get_args(Task)  # ("causal-lm", "seq-cls")


@dataclass
class TrainConfig:
    """Everything `lk.train` needs. Paths are local directories or files (`model` may also be a hub id);
    see `lorakit finetune --help`."""

    model: str
    data: str
    out: str
    task: Task = "causal-lm"
    text_field: str = "text"
    label_field: str = "label"
    targets: str | list[str] = "all-linear"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 2e-4
    lr_ratio: float = 1.0  # LoRA+: B learns lr_ratio times faster than A
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per process
    grad_accum: int = 1
    max_length: int = 256  # or the model's own limit, where that is smaller
    eval_data: str | None = None
    save_every: int = 0  # 0: only the final adapter
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")

        def whole(v: Any) -> bool:
            return isinstance(v, int)

        checks = [
            (self.r, "--rank", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.alpha, "--alpha", math.isfinite, "a finite number"),
            (self.lr, "--lr", lambda v: 0 < v < math.inf, "a positive number"),
            (self.lr_ratio, "--lr-ratio", lambda v: 0 < v < math.inf, "a positive number"),
            (self.weight_decay, "--weight-decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
            (self.dropout, "--dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            (self.warmup_ratio, "--warmup-ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            (self.epochs, "--epochs", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.batch_size, "--batch-size", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.grad_accum, "--grad-accum", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.max_length, "--max-length", lambda v: whole(v) and v >= 2, "an integer of at least 2"),
            (self.save_every, "--save-every", lambda v: whole(v) and v >= 0, "an integer >= 0"),
            (self.keep_checkpoints, "--keep-checkpoints", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.seed, "--seed", lambda v: whole(v) and v >= 0, "an integer >= 0"),
        ]
        if self.steps is not None:
            checks.append((self.steps, "--steps", lambda v: whole(v) and v > 0, "a positive integer"))
        for value, flag, ok, what in checks:
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ValueError(f"{flag} must be {what}, got {value!r}")


@dataclass
class TrainResult:
    """What `lk.train` returns: the run's directory, its step count, the last step's training loss (None when
    no step ran, as in a resume of a finished run; not finite if the run diverged), the final eval metrics
    ({} without eval data) and the wall-clock seconds."""

    out: Path
    steps: int
    final_loss: float | None
    eval: dict[str, float]
    seconds: float
