"""The one way every training run of a study trains: `Recipe` and `fit`.

Each point of a sweep (a subspace of dimension d, a LoRA rank r, full fine-tuning) is trained with the same
recipe, so that points differ only in what is trained: AdamW without weight decay, a linear warm-up over the first
tenth of the steps and a linear decay to zero (lorakit.training.loop.linear_schedule), a fixed number of steps on
batches drawn from a generator seeded for the run. The learning rate depends on what is trained (a subspace's
coordinates, LoRA factors or the weights themselves), not on d or r.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from torch import nn

from lorakit.io.console import make_progress
from lorakit.training.loop import linear_schedule

__all__ = ["WARMUP_RATIO", "Recipe", "final_loss", "fit"]

WARMUP_RATIO = 0.1

# the loss of one training batch under a model, the batch drawn with the generator
Loss = Callable[[nn.Module, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """How every run of a study trains.

    Attributes:
        steps: optimizer steps of every run.
        full_lr: AdamW's learning rate for full fine-tuning (the weights themselves).
        lora_lr: for the LoRA factors A and B (and a classification head trained beside them).
        subspace_lr: for a subspace's coordinates θ_d (and SAID's scales).
    """

    steps: int
    full_lr: float
    lora_lr: float
    subspace_lr: float


def fit(
    model: nn.Module,
    parameters: Sequence[nn.Parameter],
    loss: Loss,
    steps: int,
    lr: float,
    seed: int,
    console: Console,
    label: str,
) -> list[float]:
    """Trains `parameters` for `steps` AdamW steps of `loss`, with a progress bar; leaves `model` in eval mode.

    Args:
        model: the module `loss` runs (put in train mode for the steps: dropout on).
        parameters: what the optimizer moves.
        loss: the mean loss of one batch under `model`, the batch drawn with the generator it is given.
        steps: how many optimizer steps.
        lr: the peak learning rate (linear warm-up over the first WARMUP_RATIO of the steps, linear decay to 0).
        seed: seeds the batches' generator, so that a run is the same whenever and in whatever order it runs.
        console: where the progress bar goes.
        label: the bar's description.

    Returns:
        The loss of each step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = int(WARMUP_RATIO * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_schedule(step, warmup, steps))
    losses = []
    model.train()
    try:
        with make_progress(console) as progress:
            task = progress.add_task(label, total=steps)
            for _ in range(steps):
                value = loss(model, generator)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                scheduler.step()
                losses.append(value.item())
                progress.update(task, advance=1, description=f"{label} · loss {losses[-1]:.3f}")
    finally:
        model.eval()
    return losses


def final_loss(losses: Sequence[float]) -> float:
    """Where a run's training loss ended: the mean over its last tenth of steps (one step's loss is noisy)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)
