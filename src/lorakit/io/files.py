"""The two formats lorakit reads from outside, JSON and safetensors: nothing it reads is ever unpickled.

Every problem with a file's contents (corrupt, truncated, not safetensors, the wrong kind of JSON) becomes one
ValueError that names the file; a file that cannot be opened raises the OSError that says why, which names it.
Writers here write in place: wrap them in lorakit.io.atomic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from lorakit.io.untrusted import read_json

if TYPE_CHECKING:  # torch is imported where tensors are written: the command line reads JSON without it
    import torch

__all__ = ["open_safetensors", "read_json_object", "read_safetensors", "write_safetensors"]


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a file that is not valid JSON, holds no object, or is too large or too deeply
    nested to be read safely (lorakit.io.untrusted.read_json) is one ValueError naming it."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open(path)` for torch tensors, the one way lorakit reads a .safetensors file: a file that is missing or
    not valid safetensors (corrupt, truncated) becomes one ValueError naming it; one that exists and cannot be opened
    (permission denied) raises the OSError that says so, naming it."""
    with contextlib.suppress(FileNotFoundError):  # said below; safetensors reports a denied permission as missing
        Path(path).open("rb").close()
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A .safetensors file, created with the permissions a plain open() gives (safetensors' own save_file makes
    it readable by its owner alone). Write it inside an atomic_file / atomic_dir (lorakit.io.atomic)."""
    from safetensors.torch import save as safetensors_bytes

    path.write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (see `open_safetensors` for bad files)."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (the handle is no dict: not iterable)
