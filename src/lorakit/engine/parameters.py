"""LoRA on a parameter that is not a module's weight (PEFT's `target_parameters`), e.g. the stacked expert
weights (experts × out × in) of a mixture-of-experts layer, which no nn.Linear holds.

`LoraConfig(target_parameters=["mlp.experts.gate_up_proj"])` picks parameters by "<module path>.<name>", or its
end after a "."; each gets a LoraParameter around the module that owns it. Several parameters of one module
nest, the first in the module's own order innermost, as in PEFT, whose keys follow the nesting: the outer
adapter's factors are `<path>.lora_A.weight`, the next one's `<path>.base_layer.lora_A.weight`, and so on.

A 2-D parameter W (out × in) gets A (r × in), B (out × r), ΔW = s·B·A. A 3-D one holds E experts, stored
(E × out × in), or (E × in × out) where the module says `is_transposed = True`; each expert e has its own rank-r
update, from A (E·r × in) and B (out × r·E) laid out as PEFT lays them out:

    ΔW[e] = s · B[:, e::E] · A[e·r : (e+1)·r]

The module runs with W + Σ ΔW in the parameter's place (torch.func.functional_call): the full update is formed
on each call, as in PEFT. As there: no dropout, DoRA or lora_bias, and no mixed batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lorakit.engine.config import matches_target
from lorakit.engine.layers import LoraLayer

__all__ = ["LoraParameter", "parameter_layers"]


class LoraParameter(LoraLayer):
    """Adapters on parameter `parameter_name` of the module inside (reached through any LoraParameter nested in
    between, for the module's other targeted parameters)."""

    def __init__(self, base: nn.Module, parameter_name: str):
        super().__init__(base)
        self.parameter_name = parameter_name
        if self.weight.dim() not in (2, 3):
            raise ValueError(
                f"target_parameters: {parameter_name} has {self.weight.dim()} dimensions; LoRA takes 2 (out × in) "
                "or 3 (experts × out × in)"
            )

    def owner(self) -> nn.Module:
        """The module that holds the parameter."""
        module = self.base
        while isinstance(module, LoraParameter):
            module = module.base
        return module

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner(), self.parameter_name)

    @property
    def bias(self) -> None:
        return None

    @property
    def transposed(self) -> bool:
        return self.weight.dim() == 3 and getattr(self.owner(), "is_transposed", False)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = self.weight.shape
        experts = shape[0] if len(shape) == 3 else 1
        out, inp = shape[-2:][::-1] if self.transposed else shape[-2:]
        return (r * experts, inp), (out, r * experts)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        if self.weight.dim() == 2:
            return (B @ A) * scale
        experts = self.weight.shape[0]
        r = A.shape[0] // experts
        per_expert_B = B.reshape(B.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r): B[:, e::E]
        delta = (per_expert_B @ A.reshape(experts, r, -1)) * scale  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise ValueError("DoRA is not supported on target_parameters (nor in PEFT)")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module inside, run with W + Σ s·B·A over the active, unmerged adapters in the parameter's place."""
        if self.routing is not None:
            raise ValueError("mixed batches do not run through target_parameters (nor in PEFT)")
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self.disabled or not pending:
            return self.base(*args, **kwargs)
        path, module = self.parameter_name, self.base  # the parameter's name as seen from self.base
        while isinstance(module, LoraParameter):
            path, module = f"base.{path}", module.base
        updated = self.weight + sum(self.delta_weight(name) for name in pending)
        return functional_call(self.base, {path: updated}, args, kwargs)


def parameter_layers(
    modules: Iterable[tuple[str, nn.Module]], targets: list[str]
) -> list[tuple[str, LoraParameter, str]]:
    """(the layer's path, the layer, "<module path>.<parameter>") for every parameter `targets` pick among
    `modules` ((path, module) pairs, wrappers at their own path), outermost first within a module. A module
    wrapped already (an earlier adapter's) gives its layers; new layers are built, not placed in the model."""
    found = []
    for path, module in modules:
        chain = []  # (layer, parameter name), outermost first
        while isinstance(module, LoraParameter):
            chain.append((module, module.parameter_name))
            module = module.base
        names = [n for n, _ in module.named_parameters(recurse=False)] if not chain else []
        for name in [n for n in names if matches_target(targets, f"{path}.{n}")]:  # the first innermost
            module = LoraParameter(module, name)
            chain.insert(0, (module, name))
        for depth, (layer, name) in enumerate(chain):
            if matches_target(targets, f"{path}.{name}"):
                found.append((path + ".base" * depth, layer, f"{path}.{name}"))
    return found
