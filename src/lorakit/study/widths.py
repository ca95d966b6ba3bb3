"""Li et al.'s (2018) finding, reproduced on the digits: a task's intrinsic dimension barely depends on the network.

Li et al. trained fully connected networks of many widths and depths on MNIST from scratch in random subspaces and
found d90 about 750 for all of them, although their parameter counts differed many times over: d90 measures the
task, not the network. `width_study` does the same on scikit-learn's 8×8 digits with two-hidden-layer MLPs
(64 → w → w → 10) of the given widths, each trained from its random initialisation, all D parameters as the
reference and then in Fastfood subspaces (DID) with the same recipe.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

import torch
from rich.console import Console
from torch import nn

from lorakit.demo.experiment import load_digits_split
from lorakit.io.console import make_console
from lorakit.study.intrinsic import intrinsic_dimension
from lorakit.study.recipe import Recipe
from lorakit.study.tasks import Task, digits_objective, train_full

__all__ = ["SCRATCH_RECIPE", "WIDTHS", "digits_mlp", "scratch_digits_task", "width_study"]

WIDTHS = (32, 128)  # 3,466 and 26,122 parameters: 7.5 times as many
SCRATCH_RECIPE = Recipe(steps=400, full_lr=3e-3, lora_lr=3e-3, subspace_lr=0.1)
GRID = (32, 64, 128, 256, 512, 1024, 2048)  # ×2 apart: d90 to within a factor of √2 after one bisection


def digits_mlp(width: int) -> nn.Sequential:
    """64 → width → width → 10 with ReLUs, PyTorch's default initialisation (seed torch's generator first)."""
    return nn.Sequential(
        OrderedDict(
            linear1=nn.Linear(64, width),
            relu1=nn.ReLU(),
            linear2=nn.Linear(width, width),
            relu2=nn.ReLU(),
            linear3=nn.Linear(width, 10),
        )
    )


def scratch_digits_task(width: int, seed: int = 0, steps: int | None = None) -> Task:
    """Training a freshly initialised `digits_mlp(width)` to read upright digits (Li et al.'s setting).

    Args:
        width: the hidden layers' width, a positive integer.
        seed: seeds the split and the initialisation.
        steps: the recipe's steps (None: SCRATCH_RECIPE's).

    Returns:
        The task; its model starts at chance (about 10%).
    """
    data = load_digits_split(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = digits_mlp(width)

    loss, evaluate = digits_objective(data)
    recipe = SCRATCH_RECIPE if steps is None else replace(SCRATCH_RECIPE, steps=steps)
    return Task(
        f"a {width}-wide digits MLP from scratch",
        model.eval(),
        loss,
        evaluate,
        recipe,
        train_examples=len(data.x_train),
        eval_examples=len(data.x_test),
    )


def width_study(
    widths: Sequence[int] = WIDTHS, seed: int = 0, steps: int | None = None, console: Console | None = None
) -> list[dict]:
    """d90 (DID) of the digits for MLPs of each width, trained from scratch.

    Args:
        widths: the hidden layers' widths.
        seed: seeds the split, the initialisations, the projections and the batches.
        steps: the recipe's steps (None: SCRATCH_RECIPE's).
        console: where progress goes.

    Returns:
        One row per width: {"width", "parameters", "reference" (all parameters trained), "d90", "bracket",
        "points", "seconds"}.
    """
    console = console or make_console(stderr=True)
    rows = []
    for width in widths:
        started = time.perf_counter()
        task = scratch_digits_task(width, seed, steps)
        names = [name for name, _ in task.model.named_parameters()]
        reference = train_full(task, names, console, seed)[0]["metric"]
        result = intrinsic_dimension(
            task.model,
            task.loss,
            task.evaluate,
            reference,
            task.recipe,
            grid=GRID,
            bisections=1,
            seed=seed,
            console=console,
        )
        rows.append(
            {
                "width": width,
                "parameters": result.D,
                "reference": reference,
                "d90": result.d90,
                "bracket": result.bracket,
                "points": result.points,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        console.print(f"width {width}: {result.D:,} parameters, full training {reference:.2%}, d90 = {result.d90}")
    return rows
