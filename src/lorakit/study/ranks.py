"""LoRA's rank, measured on the study's fine-tuning (the LoRA paper's section 7, Hu et al. 2021).

- `train_lora`: one LoRA run of rank r with the study's recipe, α = 2r (s = 2 at every rank, as lorakit's
  default 16 at r = 8), on the targets LoRA would take (all-linear, or the study's --targets); a new classification
  head trains in full beside it. Its metric against its trainable parameters goes on the same axes as the
  intrinsic-dimension curve.
- `amplification`: how the learned ΔW relates to the frozen W (the paper's table 7). With U, V the top-r left and
  right singular vectors of ΔW, ‖Uᵀ W V‖_F is how much of W lies in ΔW's directions; the paper finds it small, much
  smaller than W's own top-r directions hold (‖U_Wᵀ W V_W‖_F), though larger than random directions hold, and
  ‖ΔW‖_F / ‖Uᵀ W V‖_F large: ΔW amplifies directions W already has but does not emphasise.
- The subspace similarity φ(i, j) of two adapters' A matrices (r = 8 against r = 64, and two seeds of r = 8) is
  lorakit.tools.inspect.compare on the saved adapters.
"""

from __future__ import annotations

import copy
import time

import torch
from rich.console import Console

from lorakit import lowrank
from lorakit.engine.config import ALL_LINEAR, LoraConfig
from lorakit.engine.layers import LoraLayer
from lorakit.engine.model import inject, lora_layers
from lorakit.study.intrinsic import ALL
from lorakit.study.recipe import final_loss, fit
from lorakit.study.tasks import Task

__all__ = ["ADAPTER", "SWEEP_RANKS", "amplification", "lora_targets", "train_lora"]

SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64)
ADAPTER = "default"


def lora_targets(targets: list[str] | str) -> list[str] | str:
    """The LoRA targets of a study's parameter set: every Linear but the output head for "all", else the same."""
    return ALL_LINEAR if targets == ALL else targets


def train_lora(
    task: Task, r: int, seed: int, targets: list[str] | str, console: Console
) -> tuple[dict, torch.nn.Module]:
    """Trains a rank-r LoRA on a copy of the task's model with the task's recipe.

    Args:
        task: the fine-tuning.
        r: the rank.
        seed: seeds A's initialisation and the batches.
        targets: the study's parameter set ("all" or LoRA-style targets).
        console: where progress goes.

    Returns:
        ({"r", "seed", "trainable", "metric", "loss", "seconds", "amplification"}, the adapted model), the
        amplification rows as `amplification` gives them.
    """
    started = time.perf_counter()
    model = copy.deepcopy(task.model)
    config = LoraConfig(r=r, alpha=2 * r, target_modules=lora_targets(targets), task_type=task.lora_task_type)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # A's initialisation
        inject(model, config, ADAPTER)
    trainable = [p for p in model.parameters() if p.requires_grad]
    label = f"LoRA r={r}" + (f" seed {seed}" if seed else "")
    losses = fit(model, trainable, task.loss, task.recipe.steps, task.recipe.lora_lr, seed, console, label)
    point = {
        "r": r,
        "seed": seed,
        "trainable": sum(p.numel() for p in trainable),
        "metric": task.evaluate(model),
        "loss": final_loss(losses),
        "seconds": round(time.perf_counter() - started, 2),
        "amplification": [amplification(path, layer, seed) for path, layer in lora_layers(model)],
    }
    return point, model


def amplification(path: str, layer: LoraLayer, seed: int = 0) -> dict:
    """The LoRA paper's table 7 for one layer: W's norm in ΔW's top-r directions, in its own and in random ones.

    Args:
        path: the layer's path in the model.
        layer: a LoRA layer with the adapter ADAPTER.
        seed: seeds the random directions.

    Returns:
        {"layer", "shape" ([out, in]), "r", "delta_norm" (‖ΔW‖_F), "weight_norm" (‖W‖_F), "delta_directions"
        (‖Uᵀ W V‖_F, U and V the top-r singular vectors of ΔW), "weight_directions" (the same with W's own),
        "random_directions" (with random orthonormal ones), "amplification" (‖ΔW‖_F / delta_directions) and
        "random_amplification" (‖ΔW‖_F / random_directions)}, in float64; a ratio is None where W holds nothing
        in those directions.
    """
    W = layer.as_rows(layer.weight).detach().double()  # (out, in)
    A, B = layer.lora_A[ADAPTER].detach().flatten(1), layer.lora_B[ADAPTER].detach().flatten(1)  # (r, in), (out, r)
    U, S, Vh = lowrank.factored_svd(B, A, layer.scale[ADAPTER])  # ΔW = U diag(S) Vh, k = min(out, in, r) triplets
    k = S.numel()
    generator = torch.Generator().manual_seed(seed)
    random_U = torch.linalg.qr(torch.randn(W.shape[0], k, generator=generator, dtype=torch.float64))[0]  # (out, k)
    random_V = torch.linalg.qr(torch.randn(W.shape[1], k, generator=generator, dtype=torch.float64))[0]  # (in, k)
    in_directions = lambda U_, V_: float(torch.linalg.matrix_norm(U_.T @ W @ V_))  # noqa: E731 (‖Uᵀ W V‖_F)
    delta_norm = float(torch.linalg.vector_norm(S))
    delta_directions = in_directions(U, Vh.T)
    random_directions = in_directions(random_U, random_V)
    return {
        "layer": path,
        "shape": list(W.shape),
        "r": layer.rank(ADAPTER),
        "delta_norm": delta_norm,
        "weight_norm": float(torch.linalg.matrix_norm(W)),
        "delta_directions": delta_directions,
        "weight_directions": float(torch.linalg.vector_norm(lowrank.singular_values(W)[:k])),
        "random_directions": random_directions,
        "amplification": delta_norm / delta_directions if delta_directions else None,
        "random_amplification": delta_norm / random_directions if random_directions else None,
    }
