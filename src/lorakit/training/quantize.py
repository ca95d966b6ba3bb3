"""Quantizing a loaded model's linear layers with bitsandbytes, one layer at a time: the base of QLoRA.

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto")   # mapped from the file, not read
    quantize_linears(model, bits=4, dtype=torch.bfloat16)

4 bits are NF4 with double quantization in blocks of 64, computing in `dtype` (QLoRA's choice, transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`); 8 bits are
LLM.int8()'s per-row int8 weights (`load_in_8bit=True`). As transformers converts a model, every nn.Linear becomes
the bitsandbytes layer except the output head, a weight tied to another module's, and the modules named in
`keep`; each is quantized from its weight in `dtype`, as transformers quantizes it, and gives exactly the layer that
transformers' BitsAndBytesConfig loads with that dtype. The parameters left in full precision (embeddings, norms,
the output head) take `dtype` too.

Memory: transformers 5 maps a safetensors file into memory and reads a page only when something first touches
it. Quantizing reads each weight once; its pages are then handed back to the kernel (madvise MADV_PAGEOUT on the
pages wholly inside the weight: clean pages of a file mapping are dropped, to be read again if ever touched, and
nothing is lost), so that the full-precision weights are never all resident at once: loading peaks at the
quantized model plus one layer's weight, where transformers' own quantizing load keeps every page it read.

Once the weights are small, glibc's allocator is the next cost: it serves blocks under its mmap threshold from its
heap and raises that threshold, up to 32 MiB, each time a larger mapped block is freed, so that within a step the
activations (1 to 3 MiB each here) come to be carved from a heap whose holes it cannot give back, and a training
step peaks at about twice the activations it keeps. `map_large_allocations` fixes the threshold at 128 KiB, its
starting value, for the process: blocks from there on are mapped and unmapped one by one (bench/NOTES.md has
the figures).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform
import sys
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from lorakit.engine.config import within_target
from lorakit.engine.model import output_head

__all__ = ["BITS", "import_bitsandbytes", "map_large_allocations", "quantize_linears", "release_pages"]

BITS = (4, 8)
BLOCK_SIZE = 64  # weights per 4-bit scale, bitsandbytes' and transformers' default
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold in bitsandbytes' own forward, transformers' default
MADV_PAGEOUT = 21  # Linux 5.4 and later; older kernels refuse it, and the pages simply stay
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from then on


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or one clear error where it is not installed.

    On CPUs with AVX512-BF16, importing it logs a warning that it could not fetch a hub kernel for bfloat16 4-bit
    inference (kernels-community), on every process start; lorakit's layers never use that kernel, so the warning
    is kept quiet.

    Raises:
        ValueError: bitsandbytes is not installed.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("4-bit and 8-bit bases need bitsandbytes: pip install 'lorakit[quant]'") from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


def quantize_linears(
    model: nn.Module, bits: int, dtype: torch.dtype | None = None, keep: Sequence[str] = ()
) -> nn.Module:
    """Replaces the model's nn.Linear layers by bitsandbytes' quantized ones, in place, one at a time.

    Args:
        model: a model whose weights are in memory or mapped from a file (transformers' `from_pretrained`).
        bits: 4 (NF4, double quantization) or 8 (LLM.int8()).
        dtype: the dtype 4-bit layers compute in and the parameters left unquantized take (None: the dtype of the
            model's first floating-point parameter).
        keep: names of modules to leave in full precision, matched as `modules_to_save` are (a classification
            head that trains in full).

    Returns:
        The model, changed in place.

    Raises:
        ValueError: bits is neither 4 nor 8; bitsandbytes is not installed.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    bnb = import_bitsandbytes()
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    head = output_head(model)
    owners: dict[int, set[int]] = {}  # id(parameter) -> ids of the modules that hold it
    paths: dict[int, list[str]] = {}  # id(module) -> its paths (a module can sit at several)
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    linears = {
        id(m): m
        for path, m in model.named_modules()
        if type(m) is nn.Linear and m is not head and len(owners[id(m.weight)]) == 1 and not within_target(keep, path)
    }
    for key, linear in linears.items():
        layer = quantized_layer(bnb, linear, bits, dtype)
        for path in paths[key]:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        release_pages(linear.weight)
    cast_parameters(model, dtype)
    return model


def quantized_layer(bnb: ModuleType, linear: nn.Linear, bits: int, dtype: torch.dtype) -> nn.Module:
    """The bitsandbytes layer for `linear`, its weight quantized (bitsandbytes quantizes on .to(device))."""
    shape = (linear.in_features, linear.out_features)
    weight, device, bias = linear.weight.detach(), linear.weight.device, linear.bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(*shape, bias, compute_dtype=dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(
            weight.to(dtype),
            requires_grad=False,
            blocksize=BLOCK_SIZE,
            compress_statistics=True,
            quant_type="nf4",
            module=layer,
        ).to(device)
        # In eval mode on a CPU with AVX512-BF16, bitsandbytes 0.50's own forward repacks the weight in place for
        # bfloat16 inference, after which the layer no longer trains; lorakit never calls it, others might.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(*shape, bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return layer.train(linear.training)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts the floating-point parameters to `dtype` (tied ones stay tied); quantized weights are not floats.
    (`model.to(dtype)` would also cast buffers, and bitsandbytes' weights do not survive it.)"""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                if id(p) not in cast:
                    cast[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                module._parameters[name] = cast[id(p)]


def release_pages(tensor: torch.Tensor) -> None:
    """Hands the pages wholly inside `tensor`'s bytes back to the kernel where they are mapped from a file (see
    the module's docstring); anywhere else (another OS, anonymous memory, a GPU) it does nothing."""
    if sys.platform != "linux" or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start and file_mapped(start, end):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(MADV_PAGEOUT))


def map_large_allocations() -> None:
    """Fixes glibc's mmap threshold at 128 KiB for this process (see the module's docstring): every block from
    128 KiB on is then mapped when allocated and handed back when freed, at the cost of its page faults each time.
    Where the C library is not glibc, it does nothing."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    ctypes.CDLL(None).mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD))


def file_mapped(start: int, end: int) -> bool:
    """Whether the addresses [start, end) lie in one mapping of a file (/proc/self/maps: a non-zero inode)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= start < high:
                return end <= high and fields[4] != "0"
    return False
