"""Where `extract` reads full weights from: state dicts, .safetensors files and model directories.

A model directory may be one file or shards with an index; its config.json, where transformers can build
the model on the meta device (no memory, no weights), also tells which weights are Embedding or Conv1D and
which embedding is tied to the output head.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.engine.layers import is_conv1d
from lorakit.io.files import open_safetensors, read_json_object

__all__ = ["TensorSource", "meta_model", "module_kinds", "tied_embedding"]


class TensorSource:
    """Named tensors from a state dict, a .safetensors file or a model directory (one file, or shards with
    an index), read one at a time so that a large model never sits in memory whole."""

    def __init__(self, source: str | os.PathLike | dict[str, torch.Tensor]):
        self.memory = source if isinstance(source, dict) else None
        if self.memory is not None:
            return
        self.path = Path(source)
        if self.path.is_dir():
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                self.files = _shards(index)
            else:
                # iterdir, not glob: an unreadable directory is a PermissionError, not a directory without weights
                files = sorted(p for p in self.path.iterdir() if p.suffix == ".safetensors")
                if not files:
                    raise FileNotFoundError(f"{self.path} holds no .safetensors weights")
                self.files = {key: f for f in files for key in _keys(f)}
        elif self.path.is_file():
            self.files = {key: self.path for key in _keys(self.path)}
        else:
            raise FileNotFoundError(f"no such file or directory: {self.path}")

    def names(self) -> list[str]:
        return list(self.memory if self.memory is not None else self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.memory is not None:
            return tuple(self.memory[key].shape)
        with open_safetensors(self.files[key]) as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if self.memory is not None:
            return self.memory[key]
        with open_safetensors(self.files[key]) as f:
            return f.get_tensor(key)


def _keys(path: Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


def _shards(index: Path) -> dict[str, Path]:
    """{tensor name: shard file} from a model.safetensors.index.json, with every shard it names opened and
    checked to hold the tensors the index puts there (reading headers only)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f'{index} has no "weight_map" object of tensor names to shard files')
    outside = [name for name in weight_map.values() if Path(name).name != name]
    if outside:
        raise ValueError(f"{index} names a shard outside its directory: {outside[0]!r}")
    files = {key: index.parent / name for key, name in weight_map.items()}
    held = {shard: set(_keys(shard)) for shard in dict.fromkeys(files.values())}
    for key, shard in files.items():
        if key not in held[shard]:
            raise ValueError(f"{index} puts {key!r} in {shard.name}, which does not hold it")
    return files


def meta_model(model_dir: Path) -> nn.Module | None:
    """The transformers model a directory's config.json describes, built on the meta device (no memory, no
    weights), or None where there is no config or transformers cannot build it."""
    if not (model_dir.is_dir() and (model_dir / "config.json").is_file()):
        return None
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        architecture = getattr(transformers, (config.architectures or [""])[0], None)
        if architecture is None:
            return None
        with torch.device("meta"):
            return architecture._from_config(config)
    except Exception:  # whatever transformers raises on a config it cannot build: nothing known
        return None


def module_kinds(model: nn.Module | None) -> dict[str, str]:
    """{module path: "linear" | "conv1d" | "embedding"} of a model (`meta_model`'s); {} for None."""
    kinds = {}
    for name, module in model.named_modules() if model is not None else []:
        if isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif is_conv1d(module):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
    return kinds


def tied_embedding(model: nn.Module | None) -> str | None:
    """The path of the input embedding that a transformers model (`meta_model`'s) ties to its output head, or
    None. Its checkpoint holds the shared weight once, under the embedding's name."""
    if model is None:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return None
    return next(name for name, module in model.named_modules() if module is embedding)
