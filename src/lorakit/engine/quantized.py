"""LoRA on bitsandbytes' quantized linear layers (QLoRA): the base stays 4-bit (NF4/FP4) or 8-bit, untouched, and
the adapter trains beside it in the compute dtype.

For a quantized weight with dequantized value Ŵ (out × in), the layer computes what any LoRA layer does,

    y = x Ŵᵀ + b + Σ s · B A dropout(x)

where Ŵ exists only for the product that needs it: `DequantizedLinear` forms it for x Ŵᵀ in the forward pass and
again for the input gradient g Ŵ in the backward pass, and keeps nothing of it in between. (bitsandbytes' own
layers are not called: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place the first time
the layer runs in eval mode, computes in bfloat16 from then on, and the layer no longer trains.)

The compute dtype is the 4-bit layer's own (`compute_dtype`, as transformers' `bnb_4bit_compute_dtype` sets it);
an 8-bit layer has none and computes in its input's dtype, and its adapter is created in float32, as PEFT does.

Merging rounds W + s·B·A to the layer's 4 or 8 bits (dequantize, add, quantize again), as PEFT does, with a
warning; the quantized weight from before the merge is kept, so that unmerging restores it exactly.
`dequantize_linears` (behind `lk.merge_and_unload(model, dequantize=True)`) turns every quantized linear into an
nn.Linear holding Ŵ + Σ s·B·A instead, rounded once to the model's dtype. DoRA on a quantized layer is refused.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.engine.layers import LoraLinear

CHUNK = 1 << 16  # bytes of quantized weight dequantized at a time (whole blocks): the temporaries stay small
NATIVE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # bitsandbytes' suffixes
INT8_STEP = 7.874015718698502e-3  # 1 / 127, as bitsandbytes writes it: an int8 weight's unit, times its row scale

__all__ = [
    "DequantizedLinear",
    "QuantizedLoraLinear",
    "check_quantized",
    "dequantize_linears",
    "dequantized_weight",
    "is_quantized_linear",
    "parameter_numel",
]


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes Linear4bit or Linear8bitLt. A model holds such layers only once
    bitsandbytes is imported, so a model without them never imports it."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def is_4bit(module: nn.Module) -> bool:
    return isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit)


def check_quantized(module: nn.Module) -> None:
    """Refuses a bitsandbytes layer whose weight lorakit cannot dequantize, saying why."""
    name = type(module).__name__
    if is_4bit(module):
        state = getattr(module.weight, "quant_state", None)
        if state is None:
            raise ValueError(f"this {name} holds no quantized weight yet (bitsandbytes quantizes it on .to(device))")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                f"this {name} ran in eval mode on the CPU, where bitsandbytes repacked its weight for bfloat16 "
                "inference and it no longer trains: reload the model (or set `support_avx512bf16_for_cpu = False` "
                "on its Linear4bit layers before running them)"
            )
    elif module.state.has_fp16_weights or module.weight.dtype != torch.int8:
        raise ValueError(f"this {name} keeps a floating-point weight (has_fp16_weights=True): load it in 8 bits")


def dequantized_weight(
    module: nn.Module, dtype: torch.dtype, weight: nn.Parameter | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Ŵ (out × in) in `dtype`: the layer's weight (or `weight`, one it held) dequantized, exactly as bitsandbytes
    dequantizes it (each value times its scale, in float32, then rounded to `dtype`), into `out` (out × in, `dtype`)
    or a new tensor.

    No tensor the size of the weight is made but `out`, which bitsandbytes' own functions (no `out=` on the CPU)
    would make every call (see `scratch`): a 4-bit weight goes through bitsandbytes' C kernel into `out` where the
    kernel reads it right (`native_4bit_kernel`), else, as an 8-bit one, through torch in slices of CHUNK bytes,
    each with two small temporaries.
    """
    weight = module.weight if weight is None else weight
    out = torch.empty(quantized_shape(module, weight), dtype=dtype, device=weight.device) if out is None else out
    if is_4bit(module):
        state = weight.quant_state
        scales = state.absmax
        if state.nested:  # double quantization: the block scales are 8-bit themselves, around their mean
            scales = sys.modules["bitsandbytes"].functional.dequantize_blockwise(scales, state.state2) + state.offset
        kernel = native_4bit_kernel(state, out)
        if kernel is not None:
            packed, scales = weight.data.view(torch.uint8).contiguous(), scales.float().contiguous()
            rows, cols = state.shape
            kernel(
                *(ctypes.c_void_p(t.data_ptr()) for t in (packed, scales, out)),
                *map(ctypes.c_longlong, (state.blocksize, rows, cols)),
            )
            return out
        # a byte holds two 4-bit codes, the first in its high half: its two values, for every byte at once
        codes = torch.arange(256, device=weight.device)
        pairs = torch.stack([state.code[codes >> 4], state.code[codes & 15]], dim=1).float()  # (256, 2)
        packed, flat, size = weight.data.view(torch.uint8).view(-1), out.view(-1), state.blocksize
        for start in range(0, packed.numel(), CHUNK):  # CHUNK bytes hold whole blocks of values
            values = torch.index_select(pairs, 0, packed[start : start + CHUNK].int()).view(-1)
            values = values[: flat.numel() - 2 * start]  # an odd count of values pads the last byte
            whole = values.numel() // size * size
            block = scales[2 * start // size :].float()  # the scale of each block from this chunk's first on
            values[:whole].view(-1, size).mul_(block[: whole // size, None])
            values[whole:].mul_(block[whole // size : whole // size + 1])  # a last, partial block
            flat[2 * start : 2 * start + values.numel()].copy_(values)
        return out
    # 8 bits, as bitsandbytes' int8_vectorwise_dequant: each row times its scale / 127; the scales sit on the weight
    # until bitsandbytes' own forward first runs, then on the layer's state
    scales = (weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB).view(-1, 1)
    rows = max(1, CHUNK // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        values = weight.data[start : start + rows] * scales[start : start + rows]
        out[start : start + rows].copy_(values.mul_(INT8_STEP))
    return out


def native_4bit_kernel(state: Any, out: torch.Tensor) -> Any:
    """bitsandbytes' C function that dequantizes a 4-bit weight on the CPU into a given tensor, where it reads the
    weight as bitsandbytes wrote it, else None.

    It reads the blocks row by row, so rows must hold whole blocks (bitsandbytes' own CPU op calls it whatever the
    shape, and gets other values where blocks span rows), and bitsandbytes itself avoids it from blocks of 2048
    values on. bitsandbytes' op allocates a new tensor each call; this function writes into the scratch buffer.
    """
    cols = state.shape[-1]
    dtype = NATIVE_DTYPES.get(out.dtype)
    if out.device.type != "cpu" or not out.is_contiguous() or dtype is None or cols % state.blocksize:
        return None
    if state.blocksize >= 2048 or state.quant_type not in ("nf4", "fp4"):
        return None
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError:  # another layout of bitsandbytes' internals: the torch path does the same work
        return None
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{dtype}", None)


def parameter_numel(p: torch.Tensor) -> int:
    """The number of values a parameter holds: a 4-bit weight's from its quantization state, as it stores two values
    to a byte (or more to a wider storage element), any other's its element count."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def quantized_shape(module: nn.Module, weight: nn.Parameter) -> tuple[int, int]:
    """(out, in) of a quantized weight (a 4-bit one is stored packed, its shape in its quantization state)."""
    return tuple(weight.quant_state.shape) if is_4bit(module) else tuple(weight.shape)


class Scratch(threading.local):
    """One buffer per thread, dtype and device, as large as the largest weight dequantized into it so far."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


SCRATCH = Scratch()


def scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` in this thread's scratch buffer for (`dtype`, `device`), grown where too small.

    The layers dequantize into it for the one product that needs Ŵ: a new tensor per product would cost an
    allocation of the weight's size and its first-touch page faults every time (bench/NOTES.md, "QLoRA"). The
    buffer stays as large as the largest weight, one layer's worth.
    """
    key = (dtype, torch.device(device))
    buffer = SCRATCH.buffers.get(key)
    if buffer is None or buffer.numel() < math.prod(shape):
        SCRATCH.buffers[key] = buffer = None  # the old buffer goes before the new one comes
        buffer = SCRATCH.buffers[key] = torch.empty(math.prod(shape), dtype=dtype, device=device)
    return buffer[: math.prod(shape)].view(shape)


class DequantizedLinear(torch.autograd.Function):
    """y = x Ŵᵀ + b in the compute dtype (None: x's), returned in x's dtype (as bitsandbytes does), with Ŵ formed
    for the product in forward and again for the input gradient in backward: the node keeps only the layer,
    whose weight stays quantized, so no dequantized weight outlives either pass."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, base: nn.Module, compute_dtype: torch.dtype | None
    ) -> torch.Tensor:
        dtype = compute_dtype or x.dtype
        W = dequantized_weight(base, dtype, out=scratch(quantized_shape(base, base.weight), dtype, x.device))
        y = F.linear(x.to(dtype), W, None if bias is None else bias.to(dtype))
        ctx.base, ctx.dtype, ctx.x_dtype = base, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gx = gb = None
        if ctx.needs_input_grad[0]:
            W = scratch(quantized_shape(ctx.base, ctx.base.weight), ctx.dtype, gy.device)
            gx = (gy.to(ctx.dtype) @ dequantized_weight(ctx.base, ctx.dtype, out=W)).to(ctx.x_dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, gb, None, None


class QuantizedLoraLinear(LoraLinear):
    """A bitsandbytes Linear4bit or Linear8bitLt and its adapters (see the module's docstring).

    Everything else is LoraLinear's: several adapters, disabling, mixed batches, PEFT's file keys.
    """

    def __init__(self, base: nn.Module):
        check_quantized(base)
        super().__init__(base)
        self.compute_dtype: torch.dtype | None = getattr(base, "compute_dtype", None)
        self.bits = 4 if is_4bit(base) else 8
        self.unmerged: list[nn.Parameter] = []  # the quantized weight from before the first merge, if merged

    def add_adapter(self, name: str, *args: Any, **kwargs: Any) -> None:
        super().add_adapter(name, *args, **kwargs)  # float32 factors, the weight not being a float
        if self.compute_dtype is not None:
            for table in (self.lora_A, self.lora_B):
                table[name] = nn.Parameter(table[name].detach().to(self.compute_dtype))

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        return DequantizedLinear.apply(x, self.base.bias, self.base, self.compute_dtype)

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"DoRA needs the weight's rows, and a {self.bits}-bit weight is stored packed: lorakit does "
            "not run DoRA on quantized layers"
        )

    # -- merging: dequantize, add, quantize again --------------------------------------------------------------
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """Ŵ + Σ s·B·A in float32 over the merged adapters and `names`, from the weight as it was before any
        merge: what a full-precision merge holds, before the rounding to the layer's bits."""
        merged = [*self.merged_adapters, *(n for n in names if n in self.lora_A and n not in self.merged_adapters)]
        weight = dequantized_weight(self.base, torch.float32, self.unmerged[0] if self.unmerged else None)
        for name in merged:
            weight += self.delta_weight(name).detach().float()
        return weight

    def merge(self, names: list[str]) -> None:
        new = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not new:
            return
        warnings.warn(
            f"merging an adapter into a quantized layer rounds W + s·B·A to {self.bits} bits: the outputs differ "
            "slightly from the unmerged model's (lk.merge_and_unload(model, dequantize=True) keeps full precision)",
            stacklevel=3,
        )
        weight = self.merged_weight(new)
        if not self.unmerged:
            self.unmerged.append(self.base.weight)
        self.quantize_into_base(weight)
        self.merged_adapters.extend(new)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Restores the weight from before the first merge exactly, then merges again what stays merged."""
        staying = [n for n in self.merged_adapters if names is not None and n not in names]
        if staying == self.merged_adapters:
            return
        self.base.weight = self.unmerged.pop()
        self.merged_adapters = []
        self.merge(staying)

    def quantize_into_base(self, weight: torch.Tensor) -> None:
        """Replaces the base weight by `weight` (out × in, float) quantized as the current one is. (An 8-bit layer's
        state still holds what bitsandbytes' own forward cached, if it ran: it takes the new weight's on its next
        call, and until then the state keeps the scales of a weight from before the merge.)"""
        bnb = sys.modules["bitsandbytes"]
        old = self.base.weight
        if self.bits == 4:
            new = bnb.nn.Params4bit(
                weight.to(old.quant_state.dtype),
                requires_grad=False,
                blocksize=old.blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
                module=self.base,
            )
        else:
            new = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        self.base.weight = new.to(old.device)  # bitsandbytes quantizes on .to(device)


def dequantize_linears(model: nn.Module) -> None:
    """Turns every quantized linear of the model into an nn.Linear holding its dequantized weight, in place: a
    QuantizedLoraLinear's with its active adapters added (merged ones included, from the weight as it was before the
    merge), in float32, rounded once to the model's dtype; any other quantized linear's as it is. Inactive adapters
    are dropped with their layers."""
    dtype = model_dtype(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantizedLoraLinear):
            weight = module.merged_weight(module.active_adapters)
            replace(model, path, plain_linear(weight.to(dtype), module.base.bias))
    for path, module in list(model.named_modules()):
        if is_quantized_linear(module):
            replace(model, path, plain_linear(dequantized_weight(module, dtype), module.bias))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters that are not quantized (float32 where there are none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=bias.requires_grad)
    return layer


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
