"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024), computed as PEFT computes it.

DoRA trains a magnitude beside the low-rank direction. For a layer whose weight, read one row per output, is
W (out × in), and an adapter A (r × in), B (out × r) at scale s with magnitude m (one value per output):

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖             ‖·‖: the norm of each output's row

so that, with c = m / ‖W + s·B·A‖ and the base layer's output base(x) = W x + b,

    y = base(x) + (c − 1) ⊙ W x' + c ⊙ s·B A x'

The norm is a constant for the backward pass (the paper's section 4.3, as PEFT): gradients reach m through c
and A, B through the low-rank path only. m starts at ‖W + s·B·A‖, c = 1: a fresh adapter changes nothing.
x' is dropout(x) where dropout is on (training, p > 0), and then, as in PEFT, W x' is a second product with W;
otherwise x' = x and W x is base(x) − b, which the layer has computed already.

An output row per kind; m is stored in PEFT's shape, which broadcasts over the layer's output:
- Linear, transformers' Conv1D: an output feature, m (out,);
- Conv1d/2d/3d: an output channel, W flattened to out × (in · kernel), m (1, out, 1, …);
- Embedding: an embedding dimension, W (num × dim) read as dim × num, m (dim,).

The norm never forms W + s·B·A (out × in). Row by row,

    ‖W + s·B·A‖² = ‖W‖² + 2s · Σₖ B[o,k] (W Aᵀ)[o,k] + s² · Σₖ B[o,k] (B (A Aᵀ))[o,k]

‖W‖² is kept while W is unchanged (it is frozen), W Aᵀ costs out·in·r multiply-adds and the rest r²·(in + out);
each norm is kept while W, A and B are unchanged (inference computes it once). A Linear layer with one active
DoRA adapter runs as one autograd node (`DoraLinearFunction`) that computes W x once, adds the low-rank path into
it and scales the sum in one pass.

Several adapters add up, each against the base weight: y = base(x) + Σ_k [(c_k − 1) ⊙ W x + c_k ⊙ s_k·B_k A_k x].
Merging writes exactly that into the weight, W + Σ_k [(c_k − 1) ⊙ W + c_k ⊙ s_k·B_k·A_k] (c = 1 for a plain
LoRA adapter), and keeps each c_k it used: unmerging recovers W from them rather than from norms of the merged
weight, which would be other ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lorakit.engine.layers import LoraLayer

__all__ = ["DoraLinearFunction", "add_magnitude", "linear_forward", "row_norms", "scale", "set_merged", "update"]


def row_norms(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, W_squared: torch.Tensor) -> torch.Tensor:
    """‖W + s·B·A‖ of each row, from W (out × in), A (r × in), B (out × r) and ‖W‖² of each row (out,), in
    float32 or wider, without forming the out × in sum."""
    wide = W_squared.dtype
    cross = (B.to(wide) * (W @ A.T).to(wide)).sum(1)  # Σₖ B[o,k] (W Aᵀ)[o,k] = ⟨W[o], (B A)[o]⟩
    low_rank = (B.to(wide) * (B.to(wide) @ (A.to(wide) @ A.T.to(wide)))).sum(1)  # ‖(B A)[o]‖²
    return (W_squared + (2 * s) * cross + (s * s) * low_rank).clamp_min(0).sqrt()


def _squared_rows(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(W, dim=1, dtype=torch.promote_types(W.dtype, torch.float32)).square()


def _version(t: torch.Tensor) -> tuple:
    return id(t), t.data_ptr(), t._version, t.dtype, t.device


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r × in) and B (out × r) as matrices in the layer's row view (conv kernels flattened)."""
    return layer.lora_A[name].flatten(1), layer.lora_B[name].flatten(1)


def _norm(layer: LoraLayer, name: str) -> torch.Tensor:
    """‖W + s·B·A‖ per output (out,), detached, in the magnitude's dtype; kept while W, A, B and s are unchanged
    (`_version` counts in-place updates such as an optimizer step)."""
    weight, A, B = layer.base.weight, layer.lora_A[name], layer.lora_B[name]
    W_key = _version(weight)
    key = (W_key, _version(A), _version(B), layer.scale[name])
    cached = layer.dora_cache.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        squared = layer.dora_cache.get("‖W‖²")
        if squared is None or squared[0] != W_key:
            squared = (W_key, _squared_rows(layer.as_rows(weight)))
            layer.dora_cache["‖W‖²"] = squared
        norm = row_norms(layer.as_rows(weight), *_factors(layer, name), layer.scale[name], squared[1])
        norm = norm.to(layer.lora_magnitude[name].dtype)
    layer.dora_cache[name] = (key, norm)
    return norm


def scale(layer: LoraLayer, name: str) -> torch.Tensor:
    """c = m / ‖W + s·B·A‖ (the norm detached), in the magnitude's shape."""
    m = layer.lora_magnitude[name]
    return m / _norm(layer, name).view(m.shape)


def add_magnitude(layer: LoraLayer, name: str) -> None:
    """Makes adapter `name` a DoRA adapter: m = ‖W + s·B·A‖ from its factors as they are now."""
    if getattr(layer.base, "groups", 1) != 1:
        raise ValueError(f"DoRA on a grouped convolution (groups={layer.base.groups}) is not supported")
    weight = layer.weight  # a layer kind DoRA does not take refuses in `as_rows`
    out = layer.as_rows(weight).shape[0]
    shape = (1, out, *[1] * (weight.dim() - 2)) if weight.dim() > 2 else (out,)
    with torch.no_grad():
        W = layer.as_rows(weight)
        norm = row_norms(W, *_factors(layer, name), layer.scale[name], _squared_rows(W))
    layer.lora_magnitude[name] = nn.Parameter(norm.to(layer.lora_A[name].dtype).view(shape))


def _check_unmerged(layer: LoraLayer, name: str) -> None:
    if layer.merged_adapters:  # W is no longer the base weight the norm and W x need
        raise ValueError(
            f"DoRA adapter {name!r} cannot run unmerged beside merged adapters {layer.merged_adapters}: "
            "lk.unmerge(model) first"
        )


def update(layer: LoraLayer, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    """Adapter `name`'s addition to the base output y = base(x): (c − 1) ⊙ W x' + c ⊙ s·B A x'."""
    _check_unmerged(layer, name)
    c = scale(layer, name)
    dropping = layer.training and layer.dropout[name] > 0
    x = layer.dropped(x, name)
    if dropping:  # as PEFT: W x' on the dropped input, a second product with W
        y = layer.base_output(x)
    bias = getattr(layer.base, "bias", None)
    Wx = y if bias is None else y - bias.view(c.shape)
    return (c - 1) * Wx + c * layer.low_rank(x, name)


def linear_forward(layer: LoraLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    """A Linear or Conv1D layer with one active DoRA adapter, no dropout in effect: c ⊙ (W x + s·B A x) + b, as
    one autograd node where anything needs a gradient."""
    _check_unmerged(layer, name)
    W, bias = layer.base_parameters["weight"], layer.base_parameters["bias"]
    W = W.t() if layer.fan_in_fan_out else W  # out × in, a view
    A, B, m = layer.A_parameters[name], layer.B_parameters[name], layer.lora_magnitude[name]
    n, s = _norm(layer, name), layer.scale[name]
    params = (x, W, bias, A, B, m)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return DoraLinearFunction.apply(x, W, bias, A, B, m, n, s)
    x2 = x.reshape(-1, x.shape[-1])
    z = F.linear(x2, W).addmm_(F.linear(x2, A), B.t(), alpha=s)  # W x + s·B A x, (N, out)
    y = z.mul_(m / n) if bias is None else z.mul_(m / n).add_(bias)
    return y.view(*x.shape[:-1], y.shape[-1])


class DoraLinearFunction(torch.autograd.Function):
    """y = c ⊙ z + b with z = x Wᵀ + s · (x Aᵀ) Bᵀ and c = m / n, n = ‖W + s·B·A‖ given (a constant).

    Forward computes z in one buffer (the base product, then the low-rank one added in place) and y in one
    more pass; it saves x, h = x Aᵀ (N × r) and z, which m's gradient needs. Backward scales the output
    gradient by c once, gz = g ⊙ c, then goes on as for plain LoRA with gz (one buffer for x's gradient, both
    terms accumulated into it), and gives m its gradient Σ_N g ⊙ z / n.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        s: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = x2 @ A.t()  # (N, r)
        z = F.linear(x2, W).addmm_(h, B.t(), alpha=s)  # (N, out)
        c = m / n
        y = z * c if bias is None else torch.addcmul(bias, z, c)
        ctx.save_for_backward(x2, h, z, W, A, B, c, n)
        ctx.s, ctx.shape = s, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, z, W, A, B, c, n = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gz = g * c
        gx = gW = gb = gA = gB = gm = None
        if need_m:  # z is not needed after this: the product goes into its buffer (a second backward would fail
            gm = z.mul_(g).sum(0).div_(n)  # on torch's version check, not silently)
        if need_A or need_x:
            gh = (gz @ B).mul_(ctx.s)  # (N, r)
        if need_B:
            gB = (gz.t() @ h).mul_(ctx.s)  # (out, r)
        if need_A:
            gA = gh.t() @ x2  # (r, in)
        if need_x:
            gx = (gz @ W).addmm_(gh, A).view(ctx.shape)  # (N, in)
        if need_W:
            gW = gz.t() @ x2
        if need_b:
            gb = g.sum(0)
        return gx, gW, gb, gA, gB, gm, None, None


def _unmerged_weight(layer: LoraLayer, wide: torch.dtype) -> torch.Tensor:
    """W without any merged adapter, as rows in dtype `wide`: the merged weight is γ ⊙ W + Σ_k c_k ⊙ ΔW_k with
    γ = 1 + Σ_k (c_k − 1) over the merged adapters (c_k = 1 for plain LoRA)."""
    weight = layer.as_rows(layer.base.weight.detach()).to(wide)
    gamma = torch.ones(weight.shape[0], 1, dtype=wide, device=weight.device)
    for name in layer.merged_adapters:
        c = layer.merged_scales.get(name)
        c = 1.0 if c is None else c.to(wide).view(-1, 1)
        weight = weight - c * layer.as_rows(layer.delta_weight(name).detach()).to(wide)
        gamma = gamma + (c - 1)
    return weight / gamma


def composed(layer: LoraLayer, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The base weight with exactly adapters `names` merged (base.weight's shape and dtype), and the c of each
    DoRA adapter among them: those merged already keep theirs, the others get theirs against W."""
    weight = layer.base.weight
    wide = torch.promote_types(weight.dtype, torch.float32)
    W = _unmerged_weight(layer, wide)  # rows
    squared = _squared_rows(W).to(wide)
    merged, scales = W.clone(), {}
    for name in names:
        delta = layer.as_rows(layer.delta_weight(name).detach()).to(wide)
        if name not in layer.lora_magnitude:
            merged += delta
            continue
        c = layer.merged_scales.get(name)
        if c is None:
            A, B = (t.detach() for t in _factors(layer, name))
            norm = row_norms(W, A.to(wide), B.to(wide), layer.scale[name], squared)
            c = layer.lora_magnitude[name].detach().to(wide).flatten() / norm
        scales[name] = c
        merged += (c.view(-1, 1) - 1) * W + c.view(-1, 1) * delta
    out = torch.empty_like(weight)
    layer.as_rows(out).copy_(merged)  # back from rows into the weight's own layout, through the view
    return out, scales


def set_merged(layer: LoraLayer, names: list[str]) -> None:
    """Writes the base weight with exactly adapters `names` merged (see the module's docstring)."""
    weight, scales = composed(layer, names)
    with torch.no_grad():
        layer.base.weight.copy_(weight)
    layer.merged_adapters[:] = names
    layer.merged_scales.clear()
    layer.merged_scales.update(scales)
