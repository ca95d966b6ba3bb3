"""LoRA layers: a frozen base module plus any number of named low-rank adapters.

For a wrapped weight W (out × in) and each active adapter with factors A (r × in), B (out × r):

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,        s = α / r   (α / √r with rsLoRA)

The low-rank path is applied factored, never as W + s·BA: two thin matmuls and no out × in weight
gradient. B starts at zero: a fresh adapter leaves the outputs exactly as they were. `LoraLayer.forward` is
that formula, plainly; LoraLinear computes the same through lorakit.engine.fused where it can. A DoRA adapter
(one with a magnitude, `lora_magnitude`) adds what lorakit.engine.dora says instead.

One class per kind of base layer, each saying how its update is applied and what it is as a full weight:
- LoraLinear: nn.Linear, and transformers' Conv1D (GPT-2), whose weight is stored (in × out);
- LoraEmbedding: A (r × num_embeddings), B (dim × r), the update looked up like an embedding;
- LoraConv: nn.Conv1d/2d/3d, A a conv with the base's kernel, stride and padding, B a 1×1 conv.
Beside them: nn.MultiheadAttention (lorakit.engine.attention), a parameter that is not a module's weight
(lorakit.engine.parameters) and quantized linears (lorakit.engine.quantized).
ModuleCopies, for `modules_to_save`, holds full trainable copies of a module, one per adapter.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.engine import dora, fused

__all__ = [
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModuleCopies",
    "PerSampleRouting",
    "is_conv1d",
    "wrap_module",
]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and friends): a linear layer whose weight is stored transposed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class PerSampleRouting:
    """Which adapter each sample of a batch uses: `index[i]` points into `names`, 0 meaning the base alone."""

    def __init__(self, names: list[str], index: torch.Tensor):
        self.names = names  # adapter names; position 0 is "__base__"
        self.index = index  # (batch,) long


class LoraLayer(nn.Module):
    """A base module and its adapters. Subclasses define the update's shapes, forward and full weight."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing: PerSampleRouting | None = None
        self._stack_cache: tuple | None = None  # mixed batches: stacked factors, reused while unchanged
        self.lora_bias = nn.ParameterDict()  # lora_bias: B's own bias (out,) of each adapter that has one
        self.lora_magnitude = nn.ParameterDict()  # DoRA: the magnitude m of each adapter that has one
        self.dora_cache: dict[str, tuple] = {}  # DoRA: norms kept while W, A and B are unchanged
        self.merged_scales: dict[str, torch.Tensor] = {}  # DoRA: c of each merged adapter, what unmerge needs
        self.train(base.training)  # a model in eval mode stays in eval mode (dropout!)

    # -- what subclasses define --------------------------------------------------------------------
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B A applied to x, shaped like the base output."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B A applied to dropout(x), shaped like the base output."""
        return self.low_rank(self.dropped(x, name), name)

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (base.weight's shape) as a view with one row per output: out × (in · kernel)."""
        return weight.flatten(1)

    def merge_refusal(self, names: list[str]) -> str | None:
        """Why adapters `names` cannot be folded into this layer's weights, if they cannot."""
        if any(name in self.lora_bias for name in names) and getattr(self.base, "bias", None) is None:
            return "lora_bias adds to the layer's bias when merged, and the layer has none"
        return None

    def delta_from(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """Factors A, B at scale s as a full update of base.weight (same shape)."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter as a full update of base.weight (same shape), scale included."""
        return self.delta_from(self.lora_A[name], self.lora_B[name], self.scale[name])

    # -- adapters ----------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The weight the adapters update: base.weight (a subclass may name another parameter)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def add_adapter(
        self,
        name: str,
        r: int,
        scale: float,
        dropout: float,
        init: str | bool,
        init_std: float | None = None,
        lora_bias: bool = False,
    ) -> None:
        shape_A, shape_B = self.factor_shapes(r)
        weight = self.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        A, B = torch.empty(shape_A, **factory), torch.empty(shape_B, **factory)
        self.init_factors(A, B, init, init_std)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scale[name] = scale
        self.dropout[name] = dropout
        if lora_bias:  # zero, as PEFT's; random with init=False, as nn.Linear's own init of a bias
            bias = torch.zeros(shape_B[0], **factory)
            if init is False:
                nn.init.uniform_(bias, -1 / math.sqrt(r), 1 / math.sqrt(r))
            self.lora_bias[name] = nn.Parameter(bias)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str | bool, init_std: float | None) -> None:
        """A random and B zero, so that ΔW = 0; with init=False both random (a non-zero update)."""
        r = A.shape[0]
        if init == "gaussian":
            nn.init.normal_(A, std=init_std if init_std is not None else 1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def remember_initial_factors(self, name: str) -> None:
        """Keeps A₀ and B₀ of an adapter that started from the weight (PiSSA and friends): the base holds
        W − s·B₀·A₀ from then on, and the update relative to the original W needs them."""
        self.register_buffer(f"initial_A_{name}", self.lora_A[name].detach().clone())
        self.register_buffer(f"initial_B_{name}", self.lora_B[name].detach().clone())

    def initial_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        A0 = getattr(self, f"initial_A_{name}", None)
        return None if A0 is None else (A0, getattr(self, f"initial_B_{name}"))

    def restore_original_weight(self, name: str) -> None:
        """W_res + s·B₀·A₀: gives back the weight an SVD-initialised adapter took its start from."""
        initial = self.initial_factors(name)
        if initial is not None:
            with torch.no_grad():
                self.weight.add_(self.delta_from(*initial, self.scale[name]).to(self.weight.dtype))
            delattr(self, f"initial_A_{name}")
            delattr(self, f"initial_B_{name}")

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        self.restore_original_weight(name)
        del self.lora_A[name], self.lora_B[name]
        del self.scale[name], self.dropout[name]
        if name in self.lora_bias:
            del self.lora_bias[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
            self.dora_cache.pop(name, None)
        self._stack_cache = None
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """y = base(x) + Σ over active, unmerged adapters of s · B A dropout(x)."""
        y = self.base_output(x, *args, **kwargs)  # the frozen layer: x Wᵀ + b
        if self.disabled:
            return y
        if not x.is_meta and any(p.is_meta for p in [*self.lora_A.values(), *self.lora_B.values()]):
            raise ValueError(fused.FACTORS_ON_META)
        if self.routing is not None:
            if x.shape[0] != self.routing.index.numel():
                raise ValueError(
                    f"a mixed batch names {self.routing.index.numel()} adapters for a batch of {x.shape[0]} samples"
                )
            return self.add_per_sample(y, x, self.routing)
        base_y = y
        for name in self.active_adapters:
            if name in self.lora_magnitude and name not in self.merged_adapters:
                y = y + dora.update(self, x, base_y, name).to(y.dtype)  # (c − 1) ⊙ W x + c ⊙ s · B A x
            elif name not in self.merged_adapters:
                y = y + self.adapter_output(x, name).to(y.dtype)  # s · B A dropout(x)
        return y

    def base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen layer's output, base(x) (a quantized one computes it itself: lorakit.engine.quantized)."""
        return self.base(x, *args, **kwargs)

    def dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout[name]
        x = x.to(self.lora_A[name].dtype)
        return F.dropout(x, p, self.training) if p > 0 else x

    def add_per_sample(self, y: torch.Tensor, x: torch.Tensor, routing: PerSampleRouting) -> torch.Tensor:
        """y plus each sample's own adapter. Default: every adapter on the whole batch, then a select."""
        for position, name in enumerate(routing.names):
            if name in self.lora_A:
                chosen = (routing.index == position).view(-1, *([1] * (x.dim() - 1)))
                y = y + (self.adapter_output(x, name) * chosen).to(y.dtype)
        return y

    def stacked_factors(self, routing: PerSampleRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """A (n, r_max, a) and B (n, b, r_max) of every routed adapter with 2-D factors A (r × a), B (b × r),
        stacked, zero-padded to the largest rank, scale folded into B. Position 0 (the base model alone) and
        adapters this layer does not have are all-zero factors."""
        present = [n for n in routing.names if n in self.lora_A]
        params = [p for n in present for p in (self.lora_A[n], self.lora_B[n])]
        # Without gradients the stacks are reused until a factor changes: `_version` counts in-place updates,
        # the data pointer, dtype and device change with `.to(...)`, which swaps a parameter's data in place.
        # (Writes through `p.data` bypass the version counter: use `with torch.no_grad(): p.copy_(...)`.)
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        versions = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        key = (tuple(routing.names), versions, tuple(self.scale[n] for n in present))
        cached = self._stack_cache
        if cacheable and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        r_max = max((self.rank(n) for n in present), default=1)
        ref_A, ref_B = next(iter(self.lora_A.values())), next(iter(self.lora_B.values()))
        A = ref_A.new_zeros(len(routing.names), r_max, ref_A.shape[1])
        B = ref_B.new_zeros(len(routing.names), ref_B.shape[0], r_max)
        for position, name in enumerate(routing.names):
            if name in present:
                r = self.rank(name)
                A[position, :r] = self.lora_A[name]
                B[position, :, :r] = self.lora_B[name] * self.scale[name]
        self._stack_cache = (key, A, B) if cacheable else None
        return A, B

    # -- merging -----------------------------------------------------------------------------------
    def uses_dora(self, names: list[str]) -> bool:
        return any(name in self.lora_magnitude for name in names)

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with adapters `names` merged as well, computed, not written."""
        new = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if self.uses_dora([*self.merged_adapters, *new]):
            return dora.composed(self, [*self.merged_adapters, *new])[0]
        merged = self.weight.detach().clone()
        for name in new:
            merged += self.delta_weight(name).detach().to(merged.dtype)
        return merged

    def merge(self, names: list[str]) -> None:
        new = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if self.uses_dora([*self.merged_adapters, *new]):  # DoRA scales W itself: recomposed from the base W
            dora.set_merged(self, [*self.merged_adapters, *new])
            return
        for name in new:
            self.weight.data += self.delta_weight(name).to(self.weight.dtype)
            if name in self.lora_bias:  # s · B's bias joins the layer's
                self.bias.data += (self.lora_bias[name] * self.scale[name]).to(self.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        if self.uses_dora(self.merged_adapters):
            dora.set_merged(self, [n for n in self.merged_adapters if names is not None and n not in names])
            return
        for name in list(reversed(self.merged_adapters)):
            if names is None or name in names:
                self.weight.data -= self.delta_weight(name).to(self.weight.dtype)
                if name in self.lora_bias:
                    self.bias.data -= (self.lora_bias[name] * self.scale[name]).to(self.bias.dtype)
                self.merged_adapters.remove(name)

    def routed_biases(self, routing: PerSampleRouting) -> torch.Tensor | None:
        """s · B's bias of each sample's adapter in a mixed batch (batch, out); None where no adapter has one."""
        biases = {n: self.lora_bias[n] * self.scale[n] for n in routing.names if n in self.lora_bias}
        if not biases:
            return None
        zero = torch.zeros_like(next(iter(biases.values())))
        return torch.stack([biases.get(n, zero) for n in routing.names])[routing.index]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank(n)} s={self.scale[n]:g}" for n in self.lora_A)
        return f"adapters=[{ranks}], active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """nn.Linear, or transformers' Conv1D (weight stored in × out): A (r × in), B (out × r)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.fan_in_fan_out = is_conv1d(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:  # as nn.Linear declares them: a quantized subclass stores its weight packed (bitsandbytes)
            self.in_features, self.out_features = base.in_features, base.out_features
        # What the fast path (lorakit.engine.fused) reads on every call, set up once:
        # - it computes the base layer itself, so only for the plain classes, not subclasses (quantized
        #   linears and the like) whose forward may differ;
        self.fusable = type(base) is nn.Linear or self.fan_in_fan_out
        # - the parameter tables themselves (live: whatever replaces a parameter replaces it there), for plain
        #   dict lookups instead of nn.Module.__getattr__;
        self.base_parameters = base._parameters
        self.A_parameters, self.B_parameters = self.lora_A._parameters, self.lora_B._parameters
        # - from this many tokens on, inference forms W + s·B·A (out·in·r multiply-adds) rather than the two thin
        #   products (N·r·(in + out)): a margin above the measured break-even (bench/NOTES.md).
        self.merge_from_tokens = 2 * self.in_features * self.out_features // (self.in_features + self.out_features)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The plain formula of `LoraLayer.forward`, computed by the fast path wherever it applies (one active
        adapter, or all merged): lorakit.engine.fused, tested to give the same values and gradients."""
        y = fused.fast_forward(self, x, args, kwargs)
        return super().forward(x, *args, **kwargs) if y is None else y

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out), plus B's bias where the adapter has one
        return F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name], self.lora_bias.get(name)) * self.scale[name]

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def delta_from(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        delta = (B @ A) * scale  # (out × in)
        return delta.T if self.fan_in_fan_out else delta

    def add_per_sample(self, y: torch.Tensor, x: torch.Tensor, routing: PerSampleRouting) -> torch.Tensor:
        """One gather and two batched matmuls for the whole mixed batch, the second accumulating into y."""
        A, B = self.stacked_factors(routing)  # (n, r_max, in), (n, out, r_max)
        batch = x.shape[0]
        biases = self.routed_biases(routing)  # (batch, out)
        if biases is not None:
            y = y + biases.view(batch, *[1] * (y.dim() - 2), -1).to(y.dtype)
        h = x.reshape(batch, -1, self.in_features).to(A.dtype)  # (batch, L, in)
        h = self.per_sample_dropout(h, routing)
        h = torch.bmm(h, A[routing.index].mT)  # (batch, L, r_max)
        B_routed = B[routing.index].mT  # (batch, r_max, out)
        if not h.dtype == y.dtype == B_routed.dtype:  # autocast or mixed dtypes: in-place products don't cast
            return y + torch.bmm(h, B_routed).view(y.shape).to(y.dtype)
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or B_routed.requires_grad)
        if needs_grad or not y.is_contiguous():
            return torch.baddbmm(y.reshape(batch, -1, self.out_features), h, B_routed).view(y.shape)
        return y.view(batch, -1, self.out_features).baddbmm_(h, B_routed).view(y.shape)  # no new (N, out) buffer

    def per_sample_dropout(self, h: torch.Tensor, routing: PerSampleRouting) -> torch.Tensor:
        if not self.training or not any(self.dropout.get(n, 0.0) > 0 for n in routing.names):
            return h
        p = torch.tensor([self.dropout.get(n, 0.0) for n in routing.names], device=h.device)[routing.index]
        keep = (torch.rand_like(h) >= p.view(-1, 1, 1).to(h.dtype)).to(h.dtype)
        return h * keep / (1 - p).view(-1, 1, 1).to(h.dtype)


class LoraEmbedding(LoraLayer):
    """nn.Embedding (num × dim): A (r × num), B (dim × r); the update of token t is s · B A[:, t]."""

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = self.base.weight.shape
        return (r, num), (dim, r)

    def add_adapter(self, name: str, *args: Any, lora_bias: bool = False, **kwargs: Any) -> None:
        if lora_bias:
            raise ValueError("lora_bias is not supported on an Embedding (nor in PEFT)")
        super().add_adapter(name, *args, **kwargs)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str | bool, init_std: float | None) -> None:
        """As PEFT: A zero and B normal, so the update starts at zero; init=False: both normal."""
        if init is False:
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)

    def lookup(self, tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows of `table` as the base looks up its own (padding_idx, scale_grad_by_freq), but never with its
        max_norm: F.embedding would renormalise the looked-up rows of the table itself, in place, and for
        A's columns that would rewrite the adapter on every forward pass."""
        base = self.base
        return F.embedding(tokens, table, base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # (..., ) tokens -> (..., r) -> (..., dim)
        return self.lookup(x, self.lora_A[name].T) @ self.lora_B[name].T * self.scale[name]

    def dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x  # token ids: no dropout

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # one row per embedding dimension

    def delta_from(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        return (B @ A).T * scale  # (num × dim)

    def add_per_sample(self, y: torch.Tensor, x: torch.Tensor, routing: PerSampleRouting) -> torch.Tensor:
        A, B = self.stacked_factors(routing)  # (n, r_max, num), (n, dim, r_max)
        batch = x.shape[0]
        tokens = x.reshape(batch, -1)  # (batch, L)
        h = A[routing.index.view(-1, 1), :, tokens]  # (batch, L, r_max): column `token` of the sample's own A
        return y + torch.bmm(h, B[routing.index].mT).reshape(*y.shape).to(y.dtype)


class LoraConv(LoraLayer):
    """nn.Conv1d/2d/3d: A (r × in × kernel) convolves like the base, B (out × r × 1…) mixes channels.

    A grouped convolution (groups g > 1) gets PEFT's adapter: A reads every input channel, B is grouped
    (out × r/g × 1…), r a multiple of g. Its update mixes channels across groups, which the grouped weight cannot
    hold: such a layer is never merged.
    """

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base.weight.dim() - 2]

    def merge_refusal(self, names: list[str]) -> str | None:
        if self.base.groups > 1:
            return (
                f"a grouped convolution (groups={self.base.groups}) cannot take the adapter into its weight: the "
                "update reads every input channel, each group of the weight only its own"
            )
        return super().merge_refusal(names)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        groups = self.base.groups
        if r % groups:
            raise ValueError(f"rank {r} on a convolution with groups={groups}: the rank must be a multiple of groups")
        out_channels, _, *kernel = self.base.weight.shape
        return (r, self.base.in_channels, *kernel), (out_channels, r // groups, *([1] * len(kernel)))

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base, A = self.base, self.lora_A[name]
        if base.groups == 1:
            h = base._conv_forward(x, A, None)  # the base's stride, padding and dilation
        else:  # A over every input channel, as in PEFT
            h = self.conv(x, A, None, base.stride, base.padding, base.dilation)
        return self.conv(h, self.lora_B[name], self.lora_bias.get(name), groups=base.groups) * self.scale[name]

    def delta_from(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        if self.base.groups > 1:
            raise ValueError(self.merge_refusal([]))
        return (B.flatten(1) @ A.flatten(1)).view(self.base.weight.shape) * scale


class ModuleCopies(nn.Module):
    """`modules_to_save`: the original module and a full trainable copy per adapter.

    The forward pass uses the copy of the first active adapter that has one, else the original.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: PerSampleRouting | None = None
        self.train(original.training)

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original)
        for p in self.copies[name].parameters():
            p.requires_grad_(True)

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is None or self.disabled:
            return self.current()(*args, **kwargs)
        # a mixed batch: each routed copy on the whole batch, then each sample takes its own row
        out = self.original(*args, **kwargs)
        for position, name in enumerate(self.routing.names):
            if name in self.copies:
                y = self.copies[name](*args, **kwargs)
                if not isinstance(y, torch.Tensor):
                    raise ValueError("mixed batches through modules_to_save need modules that return a tensor")
                chosen = (self.routing.index == position).view(-1, *([1] * (y.dim() - 1)))
                out = torch.where(chosen, y, out)
        return out


def wrap_module(module: nn.Module) -> LoraLayer:
    """The LoRA layer for a supported module type, or a clear error."""
    from lorakit.engine import attention, quantized  # they build on LoraLinear: imported here, not at the top

    if quantized.is_quantized_linear(module):
        return quantized.QuantizedLoraLinear(module)
    if isinstance(module, nn.MultiheadAttention):
        return attention.LoraMultiheadAttention(module)
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return LoraConv(module)
    raise ValueError(
        f"cannot put LoRA on a {type(module).__name__}: supported are nn.Linear, transformers Conv1D, "
        "nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention"
    )
