"""Adapters as stored, without a model: PEFT's config dict and its tensors, read per layer as factors.

An adapter on disk is, per layer, two factors and a scale: ΔW = s · B A with B (out × r), A (r × in).
`AdapterState` holds one (`.load(dir)`, `.save(dir)`); `.layers()` gives each layer's factors as matrices
(conv kernels flattened into columns) for the tools to work on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit import lowrank
from lorakit.engine.config import check_positive_int
from lorakit.engine.peft_format import (
    CONFIG_NAME,
    a_key_parts,
    config_from_peft,
    factor_keys,
    is_factor_key,
    peft_config_dict,
    read_adapter_config,
    read_adapter_weights,
    write_adapter_files,
)
from lorakit.io.atomic import atomic_dir

__all__ = [
    "AdapterState",
    "LayerFactors",
    "as_state",
    "check_rank_or_energy",
    "check_same_shapes",
    "chosen_rank",
    "state_from_layers",
]


@dataclass
class LayerFactors:
    """One adapted layer: ΔW = scale · B A, with A and B flattened to 2-D (conv kernels into columns)."""

    path: str
    A: torch.Tensor  # (r × in)
    B: torch.Tensor  # (out × r)
    scale: float
    kind: str = "linear"  # "linear" (Linear, Conv1D, Conv) or "embedding": the file keys differ
    a_shape: tuple[int, ...] = ()  # stored shapes, to write conv factors back as they were
    b_shape: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def stored(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New 2-D factors of rank k back in this layer's stored layout."""
        k = A.shape[0]
        a_shape = (k, *self.a_shape[1:]) if self.a_shape else tuple(A.shape)
        b_shape = (self.b_shape[0], k, *self.b_shape[2:]) if self.b_shape else tuple(B.shape)
        return A.reshape(a_shape), B.reshape(b_shape)


@dataclass
class AdapterState:
    """An adapter without a model: PEFT's config dict and its tensors under PEFT's keys.

    Attributes:
        config: adapter_config.json's fields, as PEFT writes them.
        tensors: {PEFT key: tensor}, as adapter_model.safetensors holds them.
        report: what made the adapter (the tools' per-layer ranks, errors, energy), saved as report.json beside
            it; {} for one loaded from disk.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)  # what made it (errors, energy), saved beside it

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AdapterState:
        """A PEFT-format adapter directory, its config checked and its tensors read (safetensors only).

        Args:
            directory: a directory with adapter_config.json and adapter_model.safetensors.

        Returns:
            The adapter, with an empty report. Its factors are checked by `layers`, not here.

        Raises:
            FileNotFoundError: no such directory, or it lacks adapter_config.json or adapter_model.safetensors
                (a pickled adapter_model.bin is named, never read).
            ValueError: a config that is not a JSON object, not a LoRA config, or uses an option lorakit does
                not implement; a weights file that is not valid safetensors.
        """
        directory = Path(directory)
        raw = read_adapter_config(directory)
        config_from_peft(raw, str(directory / CONFIG_NAME))  # validates it
        return cls(raw, read_adapter_weights(directory))

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes adapter_config.json, adapter_model.safetensors (and report.json if any), atomically.

        Args:
            directory: where the files go; created if missing. In an existing directory these files are replaced
                and every other entry is left alone.

        Returns:
            The directory, as a Path.

        Raises:
            NotADirectoryError: `directory` exists and is not a directory.
            OSError: the files cannot be written.
        """
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            write_adapter_files(tmp, self.config, self.tensors)
            if self.report:
                (tmp / "report.json").write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        return directory

    def layers(self) -> list[LayerFactors]:
        """The adapted layers, in file order, with their scales resolved from the config.

        Returns:
            One LayerFactors per layer: A (r × in) and B (out × r) as matrices (conv kernels flattened into
            columns), the scale for the rank stored in the file, the kind of layer and the stored shapes.

        Raises:
            ValueError: a config lorakit cannot read; an A factor without its B; factors that are not the two
                factors of one rank-r update, or hold NaN or inf; no LoRA factors at all; tensors besides the
                factors (modules_to_save copies or biases).
        """
        config = config_from_peft(self.config)
        found = []
        for key, A in self.tensors.items():
            parts = a_key_parts(key)
            if parts is None:  # a B factor, taken with its A, or something else (refused below)
                continue
            kind, path, key_B = parts
            B = self.tensors.get(key_B)
            if B is None:
                raise ValueError(f"adapter has {key} but no {key_B}")
            check_factors(key, A, key_B, B)
            r = A.shape[0]
            scale = config.scale_for(path, r)  # the stored rank decides, whatever the patterns say
            A2, B2 = A.reshape(r, -1), B.reshape(B.shape[0], r)  # conv factors as matrices
            found.append(LayerFactors(path, A2, B2, scale, kind, tuple(A.shape), tuple(B.shape)))
        if not found:
            raise ValueError("the adapter has no LoRA factors")
        extra = next((k for k in self.tensors if not is_factor_key(k)), None)
        if extra is not None:
            raise ValueError(
                f"the adapter holds more than LoRA factors ({extra!r}: modules_to_save or biases); "
                "lorakit's SVD tools work on the factors alone"
            )
        return found


def check_factors(key_A: str, A: torch.Tensor, key_B: str, B: torch.Tensor) -> None:
    """Refuses tensors that are not the two factors of one rank-r update: A (r × in ...), B (out × r [× 1 ...]),
    r ≥ 1, all finite."""
    r = A.shape[0] if A.dim() >= 2 else 0
    if r == 0 or B.dim() < 2 or B.shape[1] != r or B[0].numel() != r:
        raise ValueError(
            f"{key_A} {tuple(A.shape)} and {key_B} {tuple(B.shape)} are not the two factors of one rank-r update"
        )
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"{key_A} or {key_B} holds NaN or inf")


def as_state(adapter: str | os.PathLike | AdapterState) -> AdapterState:
    return adapter if isinstance(adapter, AdapterState) else AdapterState.load(adapter)


def state_from_layers(
    layers: Sequence[LayerFactors], factors: dict[str, tuple[torch.Tensor, torch.Tensor]], template: dict[str, Any]
) -> AdapterState:
    """An adapter whose layer `path` has 2-D factors `factors[path]` at scale 1 (α = r for every layer)."""
    tensors, ranks = {}, {}
    for layer in layers:
        A, B = layer.stored(*factors[layer.path])
        a_key, b_key = factor_keys(layer.path, layer.kind)
        tensors[a_key], tensors[b_key] = A, B
        ranks[layer.path] = A.shape[0]
    r = max(ranks.values())
    # "^": a pattern key matches a path's end at a "." (PEFT and lorakit alike), so "fc" would also pick "block.fc"
    patterns = {f"^{re.escape(path)}": k for path, k in ranks.items() if k != r}
    config = peft_config_dict(
        task_type=template.get("task_type"),
        base_model_name_or_path=template.get("base_model_name_or_path"),
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        lora_dropout=template.get("lora_dropout", 0.0),
        fan_in_fan_out=template.get("fan_in_fan_out", False),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),  # α = r everywhere: every scale is 1
    )
    return AdapterState(config, tensors)


def check_rank_or_energy(r: int | None, energy: float | None) -> None:
    """Exactly one of a positive integer rank or an energy fraction in (0, 1], checked before any work."""
    if (r is None) == (energy is None):
        raise ValueError("give exactly one of a rank or an energy fraction")
    if r is not None:
        check_positive_int("rank", r)
    elif not 0 < energy <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {energy}")


def chosen_rank(S: torch.Tensor | None, limit: int, r: int | None, energy: float | None, where: str) -> int:
    """The rank for one layer (arguments already through `check_rank_or_energy`): `r`, refused above `limit`
    (what `where` allows), or the smallest rank holding `energy` of ‖ΔW‖²_F by its singular values S."""
    if r is not None:
        if r > limit:
            raise ValueError(f"rank {r} is larger than {where} allows (at most {limit})")
        return r
    return max(1, lowrank.rank_for_energy_of_spectrum(S, energy))


def check_same_shapes(path: str, layers: list[LayerFactors]) -> None:
    shapes = {(layer.B.shape[0], layer.A.shape[1], layer.kind) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(f"layer {path} has different shapes in the adapters: {sorted(shapes)}")
