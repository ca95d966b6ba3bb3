"""LoRA on nn.MultiheadAttention, as PEFT does it: one adapter on the packed query/key/value projection
(`in_proj_weight`, 3·E × E) and one on the output projection (`out_proj`), both from the same config.

nn.MultiheadAttention never calls its projections: its forward hands `in_proj_weight` and `out_proj.weight` to
a function. So the adapters cannot run beside the base; each call runs the base with the updated weights in
their place instead (`torch.func.functional_call`), W + Σ s·B·A over the active adapters, which autograd
differentiates back to the factors. `out_proj` becomes a LoraLinear inside the attention (PEFT's key:
`<path>.base_layer.out_proj.lora_A.weight`), merged and switched like any other layer. As in PEFT: only
attentions whose query, key and value share one embedding size (one packed `in_proj_weight`), no dropout on
the adapter's input (the update is part of the weight), no mixed batches, no DoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lorakit.engine.layers import LoraLayer, LoraLinear

__all__ = ["LoraMultiheadAttention"]


class LoraMultiheadAttention(LoraLayer):
    """nn.MultiheadAttention: A (r × E), B (3E × r) on `in_proj_weight`; `base.out_proj` a LoraLinear."""

    def __init__(self, base: nn.MultiheadAttention):
        if not base._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on an nn.MultiheadAttention needs query, key and value of one embedding size (one packed "
                "in_proj_weight), as in PEFT"
            )
        super().__init__(base)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.in_proj_bias

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, embed = self.base.in_proj_weight.shape
        return (r, embed), (out, r)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        return (B @ A) * scale

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise ValueError("DoRA is not supported on an nn.MultiheadAttention (nor in PEFT)")

    def add_adapter(self, name: str, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("lora_bias"):
            raise ValueError("lora_bias is not supported on an nn.MultiheadAttention")
        super().add_adapter(name, *args, **kwargs)
        if not isinstance(self.base.out_proj, LoraLinear):
            self.base.out_proj = LoraLinear(self.base.out_proj)
        self.base.out_proj.add_adapter(name, *args, **kwargs)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        out_proj = self.base.out_proj
        if isinstance(out_proj, LoraLinear) and name in out_proj.lora_A:
            out_proj.remove_adapter(name)
            if not out_proj.lora_A:
                self.base.out_proj = out_proj.base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base attention with W + Σ s·B·A over the active, unmerged adapters in place of both projections."""
        if self.routing is not None:
            raise ValueError("mixed batches do not run through LoRA on an nn.MultiheadAttention (nor in PEFT)")
        if self.disabled:
            return self.base(*args, **kwargs)
        updated = {}
        for prefix, layer in (("", self), ("out_proj.", self.base.out_proj)):
            pending = [n for n in layer.active_adapters if n not in layer.merged_adapters]
            if pending:
                parameter = "in_proj_weight" if layer is self else "base.weight"
                updated[prefix + parameter] = layer.weight + sum(layer.delta_weight(n) for n in pending)
        return functional_call(self.base, updated, args, kwargs) if updated else self.base(*args, **kwargs)
