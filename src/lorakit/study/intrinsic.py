"""Training in a random subspace of a model's parameters, and the intrinsic dimension of a fine-tuning.

Li et al. (2018) train θ = θ₀ + P θ_d: θ₀ the starting parameters (D of them), P a fixed random D × d projection
(lorakit.study.fastfood) and θ_d the only thing that trains, starting at 0. The smallest d at which this reaches 90%
of what training all D parameters reaches, d90, is the task's intrinsic dimension. Aghajanyan et al. (2020) measured
it for fine-tuning pre-trained language models (hundreds to thousands, for models of hundreds of millions of
parameters), and added SAID: one learned scale per parameter tensor i, θᵢ = θ₀ᵢ + λᵢ (P θ_{d−m})ᵢ, the m scales
counted in d. DID (direct) is the plain form.

`SubspaceModel` wraps any nn.Module (a transformers model too): its forward calls the module through
torch.func.functional_call with the moved parameters, so the module's own parameters stay θ₀ and are never
written. `intrinsic_dimension` sweeps d on a log grid, brackets d90 and refines it by bisection.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from torch import nn
from torch.func import functional_call

from lorakit.engine.config import LoraConfig, matches_target
from lorakit.engine.model import find_targets
from lorakit.io.console import make_console
from lorakit.study.fastfood import PROJECTIONS, DenseProjection, FastfoodProjection
from lorakit.study.recipe import Loss, Recipe, final_loss, fit

__all__ = [
    "ALL",
    "METHODS",
    "IntrinsicDimension",
    "SubspaceModel",
    "intrinsic_dimension",
    "log_grid",
    "subspace_parameters",
    "train_in_subspace",
]

ALL = "all"  # every parameter of the model
METHODS = ("did", "said")
GRID_START, GRID_RATIO = 16, 4  # the default grid: 16, 64, 256, ... up to D

Evaluate = Callable[[nn.Module], float]  # the metric of a model on held-out data, higher is better


def subspace_parameters(model: nn.Module, targets: list[str] | str = ALL, head: Sequence[str] = ()) -> list[str]:
    """The names of the parameters a subspace moves, in the model's order.

    Args:
        model: the model.
        targets: "all" (every parameter), or the modules whose parameters move, picked as LoRA's target_modules
            are (a list of names or dotted suffixes, a regex matching the whole path, or "all-linear").
        head: names of modules whose parameters always move (a new classification head), matched as LoRA's
            modules_to_save are.

    Returns:
        Parameter names as `model.named_parameters()` gives them (a weight tied to another is listed once).

    Raises:
        ValueError: `targets` that match no module, or a set with no parameter.
    """
    if targets == ALL:
        names = [name for name, _ in model.named_parameters()]
    else:
        paths = find_targets(model, LoraConfig(target_modules=targets))
        modules = [path for path, _ in model.named_modules() if path in paths or matches_target(list(head), path)]
        chosen = {
            f"{path}.{name}" if path else name
            for path in modules
            for name, _ in model.get_submodule(path).named_parameters()
        }
        names = [name for name, _ in model.named_parameters() if name in chosen]
    if not names:
        raise ValueError("the subspace would move no parameter: the targets hold none")
    return names


class SubspaceModel(nn.Module):
    """`model` with its parameters `names` moved to θ₀ + P θ_d (DID) or θ₀ᵢ + λᵢ (P θ_{d−m})ᵢ (SAID).

    Only θ_d (and SAID's m scales λ, starting at 1) train; the wrapped model's parameters are frozen
    (requires_grad off) and never written, so one θ₀ serves any number of subspaces. Its buffers are used as they
    are (a BatchNorm's running statistics would be updated in training mode).

    Args:
        model: any nn.Module; call this wrapper as you would call it.
        d: the subspace's dimension, counting SAID's scales: an integer in [1, D] (in [m + 1, D + m] for SAID).
        method: "did" or "said".
        names: the parameters that move (`subspace_parameters`); None: all of them.
        projection: "fastfood", "dense", or a FastfoodProjection over the same D to share (a sweep over d draws its
            random numbers once; the subspace for d is the first d columns of it).
        seed: seeds the projection (when it is built here).

    Raises:
        ValueError: an unknown method or projection; d out of range; a shared projection of another D.
    """

    def __init__(
        self,
        model: nn.Module,
        d: int,
        method: str = "did",
        names: Sequence[str] | None = None,
        projection: str | FastfoodProjection = "fastfood",
        seed: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.model = model.requires_grad_(False)
        self.names = list(names) if names is not None else [name for name, _ in model.named_parameters()]
        tensors = [model.get_parameter(name) for name in self.names]
        self.shapes = [t.shape for t in tensors]
        self.sizes = [t.numel() for t in tensors]
        self.D = sum(self.sizes)
        said = method == "said"
        free = d - len(self.names) if said else d  # SAID spends one of d on each tensor's scale
        if isinstance(d, bool) or not isinstance(d, int) or free < 1 or free > self.D:
            low = len(self.names) + 1 if said else 1
            raise ValueError(
                f"d must be an integer in [{low}, {self.D + low - 1}] for {method.upper()} over {len(self.names)} "
                f"tensors of {self.D:,} parameters, got {d!r}"
            )
        if isinstance(projection, FastfoodProjection):
            if projection.D != self.D:
                raise ValueError(f"the projection maps into {projection.D:,} parameters, the model has {self.D:,}")
            self.projection = projection
        elif projection == "fastfood":
            self.projection = FastfoodProjection(self.D, seed)
        elif projection == "dense":
            self.projection = DenseProjection(self.D, free, seed)
        else:
            raise ValueError(f"the projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
        self.method, self.d = method, d
        self.theta = nn.Parameter(torch.zeros(free))  # (d,) or (d − m,): the start is θ₀ itself
        self.scales = nn.Parameter(torch.ones(len(self.names))) if said else None  # (m,) SAID's λ

    def trainable(self) -> list[nn.Parameter]:
        """θ_d, and SAID's scales: the d numbers that train."""
        return [self.theta] if self.scales is None else [self.theta, self.scales]

    def moved_parameters(self) -> dict[str, torch.Tensor]:
        """{name: θ₀ + offset} for every moving parameter, differentiable in θ_d (and the scales)."""
        offsets = self.projection(self.theta).split(self.sizes)  # (D,) cut into the tensors' pieces
        moved = {}
        for i, (name, shape, offset) in enumerate(zip(self.names, self.shapes, offsets, strict=True)):
            base = self.model.get_parameter(name)
            offset = offset.view(shape).to(base.dtype)
            moved[name] = base + (offset if self.scales is None else self.scales[i] * offset)
        return moved

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.moved_parameters(), args, kwargs)


@dataclass
class IntrinsicDimension:
    """The outcome of a sweep (see `intrinsic_dimension`).

    Attributes:
        method: "did" or "said".
        D: how many parameters the subspaces move.
        tensors: how many parameter tensors they are in (SAID's m).
        reference: the metric of training all D parameters.
        threshold: the fraction of it a subspace has to reach.
        d90: the smallest d found to reach the threshold (0: the starting model does); None where no d of the
            grid did.
        bracket: (largest d below d90 that does not reach it, d90), after bisection; None without a d90.
        points: every trained point, by d: {"d", "metric", "loss", "seconds"}, and d = 0 for the starting model.
    """

    method: str
    D: int
    tensors: int
    reference: float
    threshold: float
    d90: int | None
    bracket: tuple[int, int] | None
    points: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def log_grid(stop: int, start: int = GRID_START, ratio: int = GRID_RATIO) -> list[int]:
    """start, start·ratio, start·ratio², … up to `stop` (inclusive)."""
    grid, d = [], start
    while d <= stop:
        grid.append(d)
        d *= ratio
    return grid


def train_in_subspace(
    model: nn.Module,
    loss: Loss,
    evaluate: Evaluate,
    d: int,
    method: str = "did",
    names: Sequence[str] | None = None,
    projection: str | FastfoodProjection = "fastfood",
    recipe: Recipe | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Trains θ_d of one subspace of `model` with the recipe and evaluates it.

    Args:
        model: θ₀, left as it is.
        loss: the mean loss of a training batch under a model, the batch drawn with the generator it is given.
        evaluate: the metric of a model on held-out data.
        d: the subspace's dimension (see `SubspaceModel`).
        method: "did" or "said".
        names: the parameters that move (None: all).
        projection: "fastfood", "dense" or a shared FastfoodProjection.
        recipe: the training recipe (its steps and subspace_lr).
        seed: seeds the projection and the batches.
        console: where progress goes.

    Returns:
        {"d", "metric", "loss" (mean of the last tenth of the steps' losses), "seconds"}.
    """
    if recipe is None:
        raise ValueError("train_in_subspace needs a recipe")
    console = console or make_console(stderr=True)
    started = time.perf_counter()
    subspace = SubspaceModel(model, d, method, names, projection, seed)
    label = f"{method.upper()} d={d:,}"
    losses = fit(subspace, subspace.trainable(), loss, recipe.steps, recipe.subspace_lr, seed, console, label)
    seconds = round(time.perf_counter() - started, 2)
    return {"d": d, "metric": evaluate(subspace), "loss": final_loss(losses), "seconds": seconds}


def intrinsic_dimension(
    model: nn.Module,
    loss: Loss,
    evaluate: Evaluate,
    reference: float,
    recipe: Recipe,
    *,
    method: str = "did",
    targets: list[str] | str = ALL,
    head: Sequence[str] = (),
    projection: str = "fastfood",
    grid: Sequence[int] | None = None,
    bisections: int = 2,
    fraction: float = 0.9,
    seed: int = 0,
    done: MutableMapping[str, dict] | None = None,
    console: Console | None = None,
) -> IntrinsicDimension:
    """d90 of a fine-tuning: the smallest d whose subspace reaches `fraction` of the `reference` metric.

    The grid is trained in ascending order until two points in a row reach the threshold (the second shows the
    plateau) or it ends; the first grid point that reaches it and the largest point below it that does not bracket
    d90, and `bisections` geometric midpoints narrow the bracket. Every point trains with the same recipe from the
    same θ₀, its projection the first d columns of one projection (nested subspaces).

    Args:
        model: θ₀, the model as it starts (pre-trained, or freshly initialised as in Li et al.); left as it is.
        loss: the mean loss of a training batch under a model, the batch drawn with the generator it is given.
        evaluate: the metric of a model on held-out data, higher is better (accuracy, say).
        reference: the metric of training every parameter of the set (full fine-tuning) with the same data.
        recipe: steps and learning rate (subspace_lr) of every point.
        method: "did" or "said".
        targets: the parameters that move: "all", or modules picked as LoRA's targets are (`subspace_parameters`).
        head: modules whose parameters always move (a new classification head).
        projection: "fastfood" (any size) or "dense" (the reference, for small models).
        grid: the dimensions to sweep (default: 16, 64, 256, ... up to D; for SAID those above m).
        bisections: how many midpoints to train inside the bracket.
        fraction: the share of `reference` to reach (0.9: d90).
        seed: seeds the projection and the batches of every point.
        done: points already trained, by key "{method}-{d}", which are not trained again; new points are added to
            it as they finish (a mapping that writes them to disk makes a sweep resumable).
        console: where progress goes.

    Returns:
        The sweep's points, d90 and its bracket.

    Raises:
        ValueError: an unknown method or projection, targets that match no module, a fraction outside (0, 1],
            a negative number of bisections.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if bisections < 0:
        raise ValueError(f"bisections must be >= 0, got {bisections}")
    if projection not in PROJECTIONS:
        raise ValueError(f"the projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    console = console or make_console(stderr=True)
    done = {} if done is None else done
    names = subspace_parameters(model, targets, head)
    D = sum(model.get_parameter(name).numel() for name in names)
    lowest = len(names) + 1 if method == "said" else 1  # SAID needs a free direction beside its m scales

    @functools.cache
    def shared() -> str | FastfoodProjection:  # drawn once, when the first point trains (not on a full resume)
        return FastfoodProjection(D, seed) if projection == "fastfood" else projection

    threshold = fraction * reference

    def point(d: int) -> dict:
        key = f"{method}-{d}"
        if key not in done:
            if d == 0:
                done[key] = {"d": 0, "metric": evaluate(model), "loss": None, "seconds": 0.0}
            else:
                done[key] = train_in_subspace(model, loss, evaluate, d, method, names, shared(), recipe, seed, console)
            console.print(f"{method.upper()} d={d:,}: {done[key]['metric']:.4f} (threshold {threshold:.4f})")
        return done[key]

    trained = {0: point(0)}
    reached = lambda d: trained[d]["metric"] >= threshold  # noqa: E731
    d90 = bracket = None
    if reached(0):
        d90, bracket = 0, (0, 0)
    else:
        grid = sorted(d for d in (grid or log_grid(D)) if lowest <= d <= D + lowest - 1)
        in_a_row = 0
        for d in grid:
            trained[d] = point(d)
            in_a_row = in_a_row + 1 if reached(d) else 0
            if reached(d) and d90 is None:
                d90 = d
            if in_a_row == 2:
                break
        if d90 is not None:
            low = max([lowest - 1, *(d for d in trained if d < d90 and not reached(d))])
            for _ in range(bisections):
                middle = round(math.sqrt(max(low, 1) * d90))
                if not low < middle < d90:
                    break
                trained[middle] = point(middle)
                if reached(middle):
                    d90 = middle
                else:
                    low = middle
            bracket = (low, d90)
    points = [trained[d] for d in sorted(trained)]
    return IntrinsicDimension(method, D, len(names), reference, threshold, d90, bracket, points)
