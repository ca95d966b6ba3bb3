"""Matrices read from files for `lorakit rank`: a .npy array, a .csv/.txt/.tsv matrix, or the floating-point 2-D
tensors of a .safetensors file (the weights of a model: its integer buffers, such as position_ids, are no
matrices to take the rank of). Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit import lowrank
from lorakit.io.files import open_safetensors
from lorakit.io.untrusted import check_npy

__all__ = ["SUFFIXES", "read_matrices"]

SUFFIXES = (".npy", ".csv", ".txt", ".tsv", ".safetensors")


def read_matrices(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """{name: 2-D float tensor} from a .npy, .csv/.txt/.tsv or .safetensors file. Never unpickles.

    Args:
        path: the file; its suffix says how to read it.
        key: the one tensor to read from a .safetensors file, of any dtype; without it, every 2-D floating-point
            tensor of the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix, `key` with another format, a file that is not what its suffix says, a
            matrix that is not real and finite, a .safetensors file without such a tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if key is not None and suffix != ".safetensors":
        raise ValueError("--key only applies to .safetensors files")
    if suffix == ".safetensors":
        tensors = _read_safetensors(path, key)
    elif suffix == ".npy":
        with path.open("rb") as handle:  # the .npy format alone: never a pickle, nor an .npz archive
            check_npy(handle, path, copies=3)  # header against file size and memory: the array, float64, the SVD
            try:
                array = np.lib.format.read_array(handle, allow_pickle=False)
            except (ValueError, EOFError) as error:  # empty, truncated or not .npy at all
                raise ValueError(f"{path} is not a readable .npy array: {error}") from None
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"{path}: expected a real numeric array, got dtype {array.dtype}")
        tensors = {path.name: torch.from_numpy(np.asarray(array, dtype=np.float64))}
    else:
        tensors = {path.name: torch.from_numpy(_read_text_matrix(path))}
    for name, M in tensors.items():
        tensors[name] = lowrank.as_matrix(M, f"{path.name}: {name}" if name != path.name else path.name)
    return tensors


def _read_text_matrix(path: Path) -> np.ndarray:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no numbers in the file")
    delimiter = "," if "," in lines[0] else None
    rows = []
    for number, line in enumerate(lines, start=1):
        cells = [cell.strip() for cell in line.split(delimiter)]
        try:
            rows.append([float(cell) for cell in cells])
        except ValueError:
            bad = next(cell for cell in cells if not _is_float(cell))
            raise ValueError(f"{path}: non-numeric value {bad!r} on data line {number}") from None
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different lengths {sorted(widths)}")
    return np.array(rows, dtype=np.float64)


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_safetensors(path: Path, key: str | None) -> dict[str, torch.Tensor]:
    with open_safetensors(path) as f:
        keys = list(f.keys())
        if key is not None:
            if key not in keys:
                shown = ", ".join(keys[:10]) + (" …" if len(keys) > 10 else "")
                raise ValueError(f"{path}: no tensor named {key!r}; the file has: {shown}")
            return {key: f.get_tensor(key)}
        found = {k: f.get_tensor(k) for k in keys if _is_float_matrix(f.get_slice(k))}
    if not found:
        raise ValueError(f"{path}: no 2-D floating-point tensor in the file (use --key to name one)")
    return found


def _is_float_matrix(tensor_slice: Any) -> bool:
    """A 2-D floating-point tensor, from the file's header alone: safetensors names dtypes F16, F32, BF16, F8_E4M3,
    ..., and the integer and boolean ones I64, U8, BOOL, ..."""
    return len(tensor_slice.get_shape()) == 2 and tensor_slice.get_dtype().startswith(("F", "BF"))
