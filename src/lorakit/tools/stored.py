"""Adapters as stored, without a model: PEFT's config dict and its tensors, read per layer as factors.

An adapter on disk is, per layer, two factors and a scale: ΔW = s · B A with B (out × r), A (r × in).
`AdapterState` holds one (`.load(dir)`, `.save(dir)`); `.layers()` gives each layer's factors as matrices
(conv kernels flattened into columns) for the tools to work on, and `.extras()` the tensors beside them: the
full copies of `modules_to_save` (a classifier's head), trained biases, a base weight PEFT saved. The tools carry
those through as they are (resize), add them up (combine) or list them (inspect), and a classifier's labels.json
goes along.
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
from lorakit.engine.config import check_positive_int, within_target
from lorakit.engine.peft_format import (
    CONFIG_NAME,
    FLOAT_TYPES,
    PEFT_PREFIX,
    a_key_parts,
    config_from_peft,
    factor_keys,
    factor_partner,
    is_factor_key,
    peft_config_dict,
    read_adapter_config,
    read_adapter_weights,
    write_adapter_files,
)
from lorakit.io.atomic import atomic_dir
from lorakit.io.labels import LABELS_NAME, labels_json, read_labels

__all__ = [
    "AdapterState",
    "LayerFactors",
    "as_state",
    "check_rank_or_energy",
    "check_same_base",
    "check_same_shapes",
    "chosen_rank",
    "extra_kind",
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
        labels: a classifier's labels, class i being labels[i], saved as labels.json beside it (None: none).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)  # what made it (errors, energy), saved beside it
    labels: list | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AdapterState:
        """A PEFT-format adapter directory, its config checked and its tensors read (safetensors only).

        Args:
            directory: a directory with adapter_config.json and adapter_model.safetensors.

        Returns:
            The adapter, with an empty report and the labels of labels.json beside it, if any. Its factors are
            checked by `layers`, not here.

        Raises:
            FileNotFoundError: no such directory, or it lacks adapter_config.json or adapter_model.safetensors
                (a pickled adapter_model.bin is named, never read).
            ValueError: a config that is not a JSON object, not a LoRA config, or uses an option lorakit does
                not implement; a weights file that is not valid safetensors; a bad labels.json.
        """
        directory = Path(directory)
        raw = read_adapter_config(directory)
        config_from_peft(raw, str(directory / CONFIG_NAME))  # validates it
        return cls(raw, read_adapter_weights(directory), labels=read_labels(directory))

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes adapter_config.json, adapter_model.safetensors (and report.json, labels.json if any), atomically.

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
        with atomic_dir(directory, commit=CONFIG_NAME) as tmp:  # the adapter's files appear together or not at all
            write_adapter_files(tmp, self.config, self.tensors)
            if self.report:
                (tmp / "report.json").write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
            if self.labels is not None:
                (tmp / LABELS_NAME).write_text(labels_json(self.labels), encoding="utf-8")
        return directory

    def layers(self) -> list[LayerFactors]:
        """The adapted layers, in file order, with their scales resolved from the config.

        Returns:
            One LayerFactors per layer: A (r × in) and B (out × r) as matrices (conv kernels flattened into
            columns), the scale for the rank stored in the file, the kind of layer and the stored shapes.

        Raises:
            ValueError: a config lorakit cannot read, or one with target_parameters; a factor without its partner
                (an A without its B, or the reverse); factors that are not the two factors of one rank-r update,
                not of a floating-point dtype lorakit computes in, or hold NaN or inf; no LoRA factors at all.
        """
        config = config_from_peft(self.config)
        if config.target_parameters:  # an expert stack's factors are E updates, not one low-rank matrix
            raise ValueError("the adapter targets parameters (target_parameters); lorakit's SVD tools work on layers")
        lone = next((k for k in self.tensors if is_factor_key(k) and factor_partner(k) not in self.tensors), None)
        if lone is not None:  # a B without its A too: a layer the tools would otherwise drop without a word
            raise ValueError(f"adapter has {lone} but no {factor_partner(lone)}")
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
        return found

    def extras(self) -> dict[str, torch.Tensor]:
        """The tensors besides the LoRA factors, {PEFT key: tensor} in file order: `modules_to_save` copies (a
        classifier's head), trained biases, base weights PEFT saves beside an adapted embedding (`extra_kind`
        tells which)."""
        return {key: t for key, t in self.tensors.items() if not is_factor_key(key)}


def extra_kind(key: str, config: dict[str, Any]) -> str:
    """What a tensor besides the factors is: "modules_to_save copy", "trained bias" or "base weight" (PEFT saves
    the whole weight of an adapted embedding or output head beside its factors), for the adapter `config`."""
    path = key.removeprefix(PEFT_PREFIX)
    if path.endswith(".base_layer.weight"):
        return "base weight"
    if within_target(config_from_peft(config).modules_to_save, path.rsplit(".", 1)[0]):  # SEQ_CLS: the head too
        return "modules_to_save copy"
    return "trained bias" if path.endswith("bias") else "tensor"


def check_factors(key_A: str, A: torch.Tensor, key_B: str, B: torch.Tensor) -> None:
    """Refuses tensors that are not the two factors of one rank-r update: A (r × in ...), B (out × r [× 1 ...]),
    no dimension 0, of one of the floating-point dtypes adapters are stored in, all finite."""
    r = A.shape[0] if A.dim() >= 2 else 0
    if 0 in A.shape or 0 in B.shape or r == 0 or B.dim() < 2 or B.shape[1] != r or B[0].numel() != r:
        raise ValueError(
            f"{key_A} {tuple(A.shape)} and {key_B} {tuple(B.shape)} are not the two factors of one rank-r update"
        )
    if A.dtype not in FLOAT_TYPES or B.dtype not in FLOAT_TYPES:
        raise ValueError(
            f"{key_A} and {key_B} are {A.dtype} and {B.dtype}: factors are float16, bfloat16, float32 or float64"
        )
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"{key_A} or {key_B} holds NaN or inf")


def as_state(adapter: str | os.PathLike | AdapterState) -> AdapterState:
    return adapter if isinstance(adapter, AdapterState) else AdapterState.load(adapter)


def state_from_layers(
    layers: Sequence[LayerFactors],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    template: dict[str, Any],
    extras: dict[str, torch.Tensor] | None = None,
) -> AdapterState:
    """An adapter whose layer `path` has 2-D factors `factors[path]` at scale 1 (α = r for every layer), and the
    tensors `extras` besides them (modules_to_save copies, biases), which the template's `modules_to_save` and
    `bias` describe. Factors that hold NaN or inf (a sum or scale past their dtype's range) are refused, naming
    the layer."""
    tensors, ranks = {}, {}
    for layer in layers:
        A, B = layer.stored(*factors[layer.path])
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):  # weights or scales past the dtype's range
            raise ValueError(f"layer {layer.path}: the resulting factors hold NaN or inf in {A.dtype}")
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
        bias=template.get("bias", "none"),
        modules_to_save=template.get("modules_to_save"),
    )
    return AdapterState(config, {**tensors, **(extras or {})})


def check_same_base(states: Sequence[AdapterState]) -> None:
    """Refuses adapters whose configs name different base models (`base_model_name_or_path`, compared as paths:
    "./m" and "m" are one): their layers may share names and shapes, and their sum is an adapter for no model. An
    adapter that names none is taken to fit."""
    named = [
        (k, os.path.normpath(s.config["base_model_name_or_path"]))
        for k, s in enumerate(states, start=1)
        if isinstance(s.config.get("base_model_name_or_path"), str)
    ]
    for k, base in named[1:]:
        if base != named[0][1]:
            raise ValueError(
                f"adapters {named[0][0]} and {k} are for different base models, {named[0][1]!r} and {base!r} "
                "(base_model_name_or_path)"
            )


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
