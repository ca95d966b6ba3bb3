"""What `lorakit demo` is asked to run: `DemoSettings`, whose fields are also the command's flags.

Apart from the experiment (lorakit.demo.experiment) so that the command line is built without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lorakit.engine.config import check_positive_int
from lorakit.options import option

__all__ = ["DemoSettings"]


@dataclass
class DemoSettings:
    """What `lorakit demo` runs: each field but base_epochs is also one of its flags (see its --help)."""

    out: Path = option(Path("lorakit-demo"), "output directory", metavar="DIR")
    seed: int = option(0, "seed for the split, the initialisation and the batches, 0 to 2**32 - 1")
    rank: int = option(1, "LoRA rank r")
    alpha: float = option(1.0, "LoRA α; the update is scaled by α/r")
    steps: int = option(100, "fine-tuning steps for each adapter")
    base_epochs: int = 2  # epochs of the base model's training
    quick: bool = option(False, "a shorter run (at most 60 fine-tuning steps), for tests")

    def __post_init__(self) -> None:
        if not str(self.out).strip():  # Path("") is ".": the files would land wherever the command runs
            raise ValueError("--out must not be empty")
        self.out = Path(self.out)
        check_positive_int("--rank", self.rank)
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if not 0 <= self.seed < 2**32:  # scikit-learn's split takes no other seed
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        # checked here, not by LoraConfig after the base model has trained
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise ValueError(
                f"--alpha must be a finite, non-zero number (the update is scaled by α/r), got {self.alpha}"
            )
        if self.quick:
            self.steps = min(self.steps, 60)
