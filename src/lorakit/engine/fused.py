"""The fast path of LoraLinear: the same y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ, computed with fewer passes.

`LoraLinear.forward` asks `fast_forward` first and falls back to the plain formula (`LoraLayer.forward`)
wherever it answers None. Two cases are worth a path of their own:

- training with one active adapter: one autograd node (`LoraLinearFunction`) that adds the low-rank
  product into the base output in place, saves only x and h = x Aᵀ (N × r), and computes in backward just
  the gradients asked for;
- inference: nothing needs a gradient, so the cheaper association is free to choose. Forming W + s·B·A for
  the call (out·in·r multiply-adds) beats the two thin products (N·r·(in + out)) from in·out / (in + out)
  tokens on by count; the path takes it from 2·in·out / (in + out) on, a margin above the break-even measured
  on CPU (float32/64 only: in half precision it would round the small update into W's precision).

A DoRA adapter (lorakit.engine.dora) takes its own node, `DoraLinearFunction`, where no dropout is in effect.

tests/engine/test_fused.py holds both to the plain formula, values and gradients; bench/NOTES.md has the
measurements behind each choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.modules import module as module_hooks  # the hooks registered for all modules

from lorakit.engine import dora

if TYPE_CHECKING:
    from lorakit.engine.layers import LoraLinear

__all__ = ["FACTORS_ON_META", "LoraLinearFunction", "base_linear", "fast_forward"]

# The hooks that nn.Module.__call__ runs for every module (the tables are updated in place, never replaced)
GLOBAL_HOOKS = (
    module_hooks._global_forward_hooks,
    module_hooks._global_forward_pre_hooks,
    module_hooks._global_backward_hooks,
    module_hooks._global_backward_pre_hooks,
)

# W + s·B·A is formed per call only in these: in bf16/fp16 it would round the small update into W's precision
FULL_PRECISION = (torch.float32, torch.float64)

# Some ops take a meta tensor beside real ones and return garbage; accelerate's offloading leaves the factors
# there, since it moves the weights of modules that are called and the factor tables never are.
FACTORS_ON_META = (
    "LoRA factors on the meta device (offloaded, or never loaded) beside real inputs: lorakit needs them in "
    "memory, on the inputs' device"
)


def base_linear(x2: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The base layer's own computation on (N, in) rows: nn.Linear's, or Conv1D's addmm with W (in × out)."""
    if not transposed:
        return F.linear(x2, W, bias)
    return torch.addmm(bias, x2, W) if bias is not None else x2 @ W


def base_runs_alone(layer: LoraLinear) -> bool:
    """Whether calling the base module would run its forward and nothing else: no hooks on it or on every
    module (what nn.Module.__call__ checks), and no forward replaced on the instance (accelerate's offloading
    does that; old-style weight_norm computes the weight in a pre-hook). Only then may the fast path compute
    the base layer itself."""
    own = layer._modules["base"].__dict__  # looked up each call: a copy or an unpickled model has new ones
    hooks = own["_forward_hooks"], own["_forward_pre_hooks"], own["_backward_hooks"], own["_backward_pre_hooks"]
    return not (any(hooks) or any(GLOBAL_HOOKS) or "forward" in own)


def fast_forward(layer: LoraLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """`layer(x)` by the fast path, or None where only the plain formula applies (extra arguments, a disabled
    layer, a mixed batch, several unmerged adapters, mixed dtypes, autocast, a base with hooks)."""
    if not layer.fusable or args or kwargs or layer.disabled or layer.routing is not None:
        return None
    if not base_runs_alone(layer):
        return None
    active, merged = layer.active_adapters, layer.merged_adapters
    if merged and all(name in merged for name in active):  # everything is in W already: the base alone
        base = layer.base
        y = base_linear(x.reshape(-1, x.shape[-1]), base.weight, base.bias, layer.fan_in_fan_out)
        return y.view(*x.shape[:-1], layer.out_features)
    if merged or len(active) != 1:
        return None
    return _one_adapter(layer, x, active[0])


def _one_adapter(layer: LoraLinear, x: torch.Tensor, name: str) -> torch.Tensor | None:
    W, bias = layer.base_parameters["weight"], layer.base_parameters["bias"]
    A, B = layer.A_parameters[name], layer.B_parameters[name]
    if (A.is_meta or B.is_meta) and not x.is_meta:
        raise ValueError(FACTORS_ON_META)
    dtype = x.dtype
    if x.is_meta or not (dtype == W.dtype == A.dtype == B.dtype) or torch.is_autocast_enabled(x.device.type):
        return None  # shapes only, mixed dtypes, or autocast choosing one per op
    scale, p = layer.scale[name], layer.dropout[name]
    if name in layer.lora_magnitude:  # DoRA; with dropout in effect, the plain formula
        return None if p > 0 and layer.training else dora.linear_forward(layer, x, name)
    if name in layer.lora_bias:  # lora_bias: s · B's bias adds to the layer's own
        lora_bias = layer.lora_bias[name] * scale
        bias = lora_bias if bias is None else bias + lora_bias
    x_lora = F.dropout(x, p, True) if p > 0 and layer.training else None
    needs_grad = x.requires_grad or A.requires_grad or B.requires_grad or W.requires_grad
    if torch.is_grad_enabled() and (needs_grad or (bias is not None and bias.requires_grad)):
        return LoraLinearFunction.apply(x, x_lora, W, bias, A, B, scale, layer.fan_in_fan_out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    if x2.shape[0] >= layer.merge_from_tokens and x_lora is None and dtype in FULL_PRECISION:
        # W + s·B·A once (out·in·r multiply-adds) instead of N·r·(in + out) for the two thin products
        left, right = (A.t(), B.t()) if layer.fan_in_fan_out else (B, A)
        y = base_linear(x2, torch.addmm(W, left, right, alpha=scale), bias, layer.fan_in_fan_out)
    else:
        y = base_linear(x2, W, bias, layer.fan_in_fan_out)
        y.addmm_(F.linear(x2 if x_lora is None else x_lora.reshape(x2.shape), A), B.t(), alpha=scale)
    return y.view(*x.shape[:-1], layer.out_features)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x' Aᵀ) Bᵀ for one adapter, x' = dropout(x) (None: x itself), as one autograd node.

    Forward adds the low-rank product into the base output in place (one addmm with s as alpha) and
    saves only x' and h = x' Aᵀ (N × r). Backward computes just the gradients asked for, and accumulates
    the input gradient's two terms, g W + s (g B) A, into one buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        transposed: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        h = xl2 @ A.t()  # (N, r)
        y = base_linear(x2, W, bias, transposed)  # (N, out)
        y.addmm_(h, B.t(), alpha=scale)
        ctx.save_for_backward(xl2, x2 if W.requires_grad else None, h, W, A, B)
        ctx.scale, ctx.transposed, ctx.shape, ctx.shared = scale, transposed, x.shape, x_lora is None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xl2, x2, h, W, A, B = ctx.saved_tensors
        need_x, need_xl, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gx = gxl = gW = gb = gA = gB = None
        if need_A or need_xl or (need_x and ctx.shared):
            gh = (g @ B).mul_(ctx.scale)  # (N, r)
        if need_B:
            gB = (g.t() @ h).mul_(ctx.scale)  # (out, r)
        if need_A:
            gA = gh.t() @ xl2  # (r, in)
        if need_x:
            gx = g @ (W.t() if ctx.transposed else W)  # (N, in)
            if ctx.shared:
                gx.addmm_(gh, A)
            gx = gx.view(ctx.shape)
        if need_xl and not ctx.shared:
            gxl = (gh @ A).view(ctx.shape)
        if need_W:
            gW = x2.t() @ g if ctx.transposed else g.t() @ x2
        if need_b:
            gb = g.sum(0)
        return gx, gxl, gW, gb, gA, gB, None, None
