"""LoRAParametrization: the notes' LoRA, for `torch.nn.utils.parametrize`.

    layer = nn.Linear(784, 1000)
    parametrize.register_parametrization(
        layer, "weight", LoRAParametrization(*layer.weight.shape, rank=1, alpha=1)
    )

Every access to `layer.weight` then returns W + s · B A (s = alpha / rank) while `enabled` is true, and
W itself while it is false. Naming follows the notes: `(features_in, features_out)` is the weight's shape
as stored, i.e. (out, in) for nn.Linear; A is (rank × features_out) ~ N(0, 1) and B (features_in × rank)
starts at zero, so B A has the weight's shape and starts at zero. A conv layer's weight (out, in, k, k)
is updated as the (out, in·k·k) matrix it flattens to: `LoRAParametrization(out, in * k * k)`. The factors
are float32 whatever the layer's dtype; only the sum W + s·BA takes the layer's.

This materialises the full W + s·BA on every forward pass, and autograd then builds a full-size gradient
for it: clear for learning, slower and heavier for training than lorakit's layers (`lk.inject`), which
apply the two factors to the input and never form W + s·BA. Given the same A and B the two give the same
outputs (tests/engine/test_parametrize.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.engine.config import check_positive_int

__all__ = ["LoRAParametrization"]


class LoRAParametrization(nn.Module):
    """W ↦ W + (alpha / rank) · B A while `enabled`, W itself otherwise (for torch.nn.utils.parametrize).

    A (rank × features_out) ~ N(0, 1), B (features_in × rank) zero. `(features_in, features_out)` is the
    weight's shape as stored: (out, in) for nn.Linear, (out, in·k·k) for a conv weight (out, in, k, k).

    Args:
        features_in: the weight's first dimension as stored (out for nn.Linear and conv layers).
        features_out: the product of its other dimensions (in for nn.Linear, in·k·k for a conv layer).
        rank: the rank of the update, a positive integer.
        alpha: the scale numerator: the update is (alpha / rank) · B A.
        device: where A and B are created (float32, whatever the layer's dtype).

    Attributes:
        lora_A: A (rank × features_out), drawn from N(0, 1).
        lora_B: B (features_in × rank), zero at the start.
        scale: alpha / rank.
        enabled: whether `forward` adds the update (True) or returns W as it is.

    Raises:
        ValueError: `rank` is not a positive integer.
    """

    def __init__(
        self, features_in: int, features_out: int, rank: int = 1, alpha: float = 1, device: str = "cpu"
    ) -> None:
        super().__init__()
        check_positive_int("rank", rank)
        # LoRA paper, section 4.1: A random Gaussian, B zero, so ΔW = BA is zero at the start
        self.lora_A = nn.Parameter(torch.randn(rank, features_out, device=device))
        self.lora_B = nn.Parameter(torch.zeros(features_in, rank, device=device))
        # ΔW is scaled by α/r, so that changing r needs no retuning of the learning rate
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, original_weights: torch.Tensor) -> torch.Tensor:
        """The weight the layer uses in place of `original_weights`.

        Args:
            original_weights: the layer's registered weight W, of shape (features_in, features_out) or one that
                flattens to it (a conv weight).

        Returns:
            W + scale · B A in W's shape and dtype while `enabled`, else W itself.

        Raises:
            ValueError: W does not flatten to (features_in, features_out), checked while `enabled` only.
        """
        if not self.enabled:
            return original_weights
        delta = self.lora_B @ self.lora_A  # (features_in, features_out)
        rows = original_weights.shape[0]
        columns = original_weights.numel() // rows  # a conv weight (out, in, k…) is updated as (out, in·k…)
        if delta.shape != (rows, columns):
            raise ValueError(
                f"LoRAParametrization{tuple(delta.shape)} makes a {tuple(delta.shape)} update for a weight of "
                f"shape {tuple(original_weights.shape)}: pass the weight's rows and the rest, "
                f"LoRAParametrization({rows}, {columns})"
            )
        # the factors stay float32 (torch's default) for a half-precision layer: only the sum takes its dtype,
        # which parametrize requires of the weight it returns
        return original_weights + (delta * self.scale).view(original_weights.shape).to(original_weights.dtype)
