"""Quantizing a model as it loads (lorakit.training.quantize): the full-precision weights it reads from a file
mapping are handed back to the kernel, layer by layer, and nothing of their values is lost."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lorakit.engine.quantized import dequantized_weight
from lorakit.training.quantize import import_bitsandbytes, quantize_linears, release_pages

bnb = import_bitsandbytes()
SIZE = 512  # a 512 × 512 float32 weight: 1 MiB, 256 pages


def mapped_weights(path, count):
    """`count` SIZE × SIZE weights read from one file through a private mapping, as safetensors maps a checkpoint;
    nothing of the file is resident yet."""
    values = torch.randn(count, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with open(path, "wb") as f:
        f.write(values.numpy().tobytes())
        os.fsync(f.fileno())  # clean pages: the kernel drops dirty ones only once written back
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", shape=(count, SIZE, SIZE)))
    return mapped, values


def resident_kib(path) -> int:
    """Kibibytes of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_release_pages_drops_a_weight_s_file_pages_and_keeps_its_values(tmp_path):
    mapped, values = mapped_weights(tmp_path / "weights.bin", 1)
    assert mapped.sum().item() == pytest.approx(values.sum().item(), rel=1e-4)  # every page read in
    before = resident_kib(tmp_path / "weights.bin")
    assert before >= SIZE * SIZE * 4 // 1024
    release_pages(mapped)
    assert resident_kib(tmp_path / "weights.bin") <= 8  # at most the two partial pages at the ends
    assert torch.equal(mapped, values)  # read again from the file where touched


def test_release_pages_leaves_memory_that_is_not_a_file_alone():
    weight = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    kept = weight.clone()
    release_pages(weight)  # anonymous memory: paging it out would lose it, so nothing happens
    assert torch.equal(weight, kept)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizing_a_mapped_model_keeps_none_of_its_full_precision_weights_resident(tmp_path, bits):
    """After quantize_linears, the file's pages that the quantized layers read are handed back: what stays
    resident is the quantized model, not the float32 one it came from."""
    mapped, values = mapped_weights(tmp_path / "weights.bin", 4)
    model = nn.Sequential(*(nn.Linear(SIZE, SIZE, bias=False, device="meta") for _ in range(4)))
    for linear, weight in zip(model, mapped, strict=True):
        linear.weight = nn.Parameter(weight, requires_grad=False)
    quantize_linears(model, bits, torch.float32)
    assert all(isinstance(m, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt) for m in model)
    assert resident_kib(tmp_path / "weights.bin") <= 4 * 8
    for layer, weight in zip(model, values, strict=True):  # quantized from the weights as they were in the file
        step = 0.16 * weight.abs().max() if bits == 4 else weight.abs().amax(1, keepdim=True) / 127
        assert ((dequantized_weight(layer, torch.float32) - weight).abs() <= step).all()


PROBE = """
import ctypes, sys, torch
from lorakit.training.quantize import map_large_allocations


class MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2 (2.33 and later)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallocInfo
if sys.argv[1] == "fixed":
    map_large_allocations()
torch.empty(1 << 20)  # a 4 MiB block, mapped and freed: glibc's own threshold would rise to 4 MiB
before = libc.mallinfo2().hblkhd
block = torch.empty(1 << 18)  # 1 MiB
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.slow  # two fresh processes importing torch
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_map_large_allocations_keeps_mapping_blocks_a_larger_free_would_have_moved_to_the_heap():
    """Each way in a fresh process: glibc serves a block from a hole in its heap wherever one is large enough,
    whatever the threshold, so a process that has run for a while says nothing about the threshold."""

    def mapped_bytes_of_a_1_mib_block(allocator):
        done = subprocess.run([sys.executable, "-c", PROBE, allocator], capture_output=True, text=True, check=True)
        return int(done.stdout)

    assert mapped_bytes_of_a_1_mib_block("glibc defaults") == 0  # from the heap, where it may leave a hole
    assert mapped_bytes_of_a_1_mib_block("fixed") >= 1 << 20  # mapped, and unmapped when freed
