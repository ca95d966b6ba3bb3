"""Adapter files in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

A lorakit adapter loads with `PeftModel.from_pretrained`, and a directory written by PEFT's
`save_pretrained` loads with `load_adapter`. Files are only ever read as JSON and safetensors: nothing
is unpickled. Saving is atomic (a temporary directory renamed into place), and a load that fails for
any reason leaves the model exactly as it was.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.engine.config import PISSA_NITER, LoraConfig, is_svd_init, matches_target
from lorakit.engine.layers import LoraEmbedding, LoraLayer, LoraLinear, wrap_module
from lorakit.engine.model import (
    adapter_parameters,
    candidate_modules,
    check_known,
    configs,
    delete_adapter,
    find_targets,
    inject,
    is_nested,
    lora_layers,
    lora_state_dict,
    mark_trainable,
    module_copies,
    set_adapter,
)
from lorakit.engine.parameters import LoraParameter
from lorakit.engine.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    base_weight_key,
    config_from_peft,
    config_to_peft,
    doubled_rank_config,
    factor_keys,
    read_adapter_config,
    read_adapter_header,
    read_adapter_weights,
    wrapper_key,
    write_adapter_files,
)
from lorakit.engine.state import restore_state, snapshot_state
from lorakit.engine.svd_init import to_plain_lora
from lorakit.io.atomic import atomic_dir

__all__ = [
    "check_adapter_shapes",
    "check_adapter_tensors",
    "check_adapter_values",
    "check_planned_shapes",
    "load_adapter",
    "peft_config",
    "save_adapter",
    "write_adapter",
]


def peft_config(model: nn.Module, adapter: str, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter's config as PEFT writes it in adapter_config.json; without `base_model_name_or_path`, the
    model's own `name_or_path` (a transformers model's: the directory or hub name it was loaded from), as PEFT
    records it, so that `AutoModelFor...from_pretrained(adapter_dir)` finds the base."""
    check_known(model, [adapter])
    if base_model_name_or_path is None:
        base_model_name_or_path = model.__dict__.get("name_or_path")  # PEFT's own lookup: None on a plain module
    config = configs(model)[adapter]
    # the modules targeted by name: not the layers inside others, nor those of target_parameters
    paths = [
        path
        for path, layer in lora_layers(model)
        if adapter in layer.lora_A and not isinstance(layer, LoraParameter) and not is_nested(model, path)
    ]
    fan_in_fan_out = any(
        isinstance(layer, LoraLinear) and layer.fan_in_fan_out and adapter in layer.lora_A
        for _, layer in lora_layers(model)
    )
    return config_to_peft(config, exact_targets(model, paths), fan_in_fan_out, base_model_name_or_path)


def exact_targets(model: nn.Module, paths: list[str]) -> list[str] | str:
    """The targets to write, so that any reader adapts exactly the adapted modules: the paths' last components
    (as PEFT writes them) where those pick no other module, else the full paths, else (a full path can be the
    end of another module's, "fc" of "block.fc") a regex that matches the whole path."""
    names = [name for name, _ in candidate_modules(model, into_copies=True)]  # as a model with this adapter alone
    for targets in (sorted({path.rsplit(".", 1)[-1] for path in paths}), sorted(paths)):
        if {name for name in names if matches_target(targets, name)} == set(paths):
            return targets
    return "|".join(re.escape(path) for path in sorted(paths))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    convert_to_lora: bool = False,
) -> Path:
    """Writes `adapter` as a PEFT adapter directory, atomically.

    convert_to_lora=True, for adapters initialised from the weight (PiSSA, MiLoRA, OLoRA), writes the
    equivalent plain LoRA of rank 2r relative to the original weight instead, which loads onto an
    untouched base model (as PEFT's `path_initial_model_for_weight_conversion` does).

    Args:
        model: a model with adapters.
        directory: where adapter_config.json and adapter_model.safetensors go; created if missing. In an
            existing directory those two files are replaced and every other entry is left alone.
        adapter: the name of the adapter to write.
        base_model_name_or_path: written into adapter_config.json, where PEFT's loaders and transformers'
            `from_pretrained(directory)` look for the base model (None: the model's own `name_or_path`, as PEFT
            records it: where a transformers model was loaded from; null for a plain PyTorch module).
        convert_to_lora: for an adapter initialised from the weight, write the plain rank-2r LoRA (above); for
            any other adapter it changes nothing.

    Returns:
        The directory, as a Path.

    Raises:
        ValueError: the model has no adapter named `adapter`.
        NotADirectoryError: `directory` exists and is not a directory.
        OSError: the files cannot be written.

    Warns:
        UserWarning: an adapter initialised with "pissa_niter_K", saved without convert_to_lora: PEFT re-runs
            its own, unseeded randomized SVD when loading it and starts from other factors.
    """
    directory = Path(directory)
    with atomic_dir(directory, commit=CONFIG_NAME) as tmp:  # the two files appear together or not at all
        write_adapter(model, tmp, adapter, base_model_name_or_path, convert_to_lora)
    return directory


def write_adapter(
    model: nn.Module,
    directory: Path,
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    convert_to_lora: bool = False,
) -> None:
    """Writes the two adapter files into an existing directory (not atomic by itself: see save_adapter)."""
    config = peft_config(model, adapter, base_model_name_or_path)
    tensors = lora_state_dict(model, adapter)
    init = configs(model)[adapter].init
    if not convert_to_lora and isinstance(init, str) and PISSA_NITER.fullmatch(init):
        warnings.warn(
            f"adapter {adapter!r} starts from the randomized SVD ({init}), which a loader re-runs: lorakit's is "
            "seeded and gives the same start, PEFT's is not and gives another; save with convert_to_lora=True for "
            "a file that PEFT reproduces exactly",
            stacklevel=3,
        )
    if convert_to_lora and is_svd_init(init):
        for path, layer in lora_layers(model):
            if adapter in layer.lora_A and layer.initial_factors(adapter) is not None:
                A0, B0 = layer.initial_factors(adapter)
                A, B = to_plain_lora(layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach(), A0, B0)
                a_key, b_key = factor_keys(path, "linear")  # SVD inits are for linear layers only
                tensors[a_key], tensors[b_key] = A, B
        config = doubled_rank_config(config)
    write_adapter_files(directory, config, tensors)


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", trainable: bool = False
) -> nn.Module:
    """Injects an adapter as described by a PEFT adapter directory and loads its weights.

    Every check (missing or corrupt file, missing or unknown key, shape mismatch, NaN) runs before any weight
    is written, and on any error the model is left exactly as it was: modules, weights, which parameters
    train, and lorakit's bookkeeping (a plain model stays plain).

    Args:
        model: any PyTorch model with the modules the adapter's config targets.
        directory: a directory with adapter_config.json and adapter_model.safetensors (read as JSON and
            safetensors only).
        adapter: the name the adapter gets in the model; it becomes the active one.
        trainable: False freezes the loaded adapter and leaves the training of the model's other adapters as
            it was (as PEFT's is_trainable=False); True makes it the only adapter that trains.

    Returns:
        The model, changed in place.

    Raises:
        FileNotFoundError: no such directory, or a file of the adapter is missing.
        ValueError: a bad or unsupported config, a file that does not fit the model, or a name in use.
    """
    directory = Path(directory)
    config = config_from_peft(read_adapter_config(directory), str(directory / CONFIG_NAME))
    shapes = read_adapter_header(directory)  # nothing allocated: the shapes are checked first
    if adapter in configs(model):
        raise ValueError(f"the model already has an adapter named {adapter!r}; delete it first or pick another name")
    check_planned_shapes(model, config, shapes, directory / WEIGHTS_NAME)  # before inject allocates any factor
    state_before = snapshot_state(model)
    # an adapter loaded frozen leaves the others' training as it was (inject alone would freeze them)
    training = [p for name in configs(model) for p in adapter_parameters(model, name).values() if p.requires_grad]
    # keyed by the parameters themselves: wrapping renames them (q_proj.weight becomes q_proj.base.weight)
    params_before = list(model.parameters())
    requires_grad = [p.requires_grad for p in params_before]
    # an SVD init rewrites base weights; keep them to put back exactly if the load fails
    weights = [p.detach().clone() for p in params_before] if is_svd_init(config.init) else []
    try:
        inject(model, config, adapter)
        params = adapter_parameters(model, adapter)
        params.update(saved_base_weights(model, adapter, shapes))
        params.update(saved_wrapper_biases(model, adapter, shapes))
        check_adapter_shapes(shapes, params, directory / WEIGHTS_NAME)
        tensors = read_adapter_weights(directory)  # now known to be the sizes of the model's own parameters
        check_adapter_values(tensors, directory / WEIGHTS_NAME)
    except BaseException:
        try:
            if adapter in configs(model):
                delete_adapter(model, adapter)
            if state_before is not None:
                set_adapter(model, state_before.active)
        finally:
            restore_state(model, state_before)
            with torch.no_grad():
                for i, p in enumerate(params_before):
                    p.requires_grad_(requires_grad[i])
                    if weights:
                        p.copy_(weights[i])
        raise
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    if trainable:
        mark_trainable(model, adapter)
    else:
        for p in params.values():
            p.requires_grad_(False)
        for p in training:
            p.requires_grad_(True)
    return model


def saved_base_weights(model: nn.Module, adapter: str, stored: Container[str]) -> dict[str, nn.Parameter]:
    """PEFT saves the whole base weight of an adapted `embed_tokens` / `lm_head` beside its factors, as
    `<path>.base_layer.weight`; such keys (among the file's, `stored`) load into the base layer."""
    found = {}
    for path, layer in lora_layers(model):
        key = base_weight_key(path)
        if adapter in layer.lora_A and key in stored:
            found[key] = layer.base.weight
    return found


def saved_wrapper_biases(model: nn.Module, adapter: str, stored: Container[str]) -> dict[str, nn.Parameter]:
    """PEFT with bias="all" also saves each modules_to_save wrapper's biases under its inner names:
    `<path>.modules_to_save.<name>` (the copy's again, beside `<path>.<name>`) and `<path>.original_module.<name>`
    (the original module's); such keys (among the file's, `stored`) load there."""
    found = {}
    for path, copies in module_copies(model):
        if adapter in copies.copies:
            for inner, module in (("modules_to_save", copies.copies[adapter]), ("original_module", copies.original)):
                for name, p in module.named_parameters():
                    key = wrapper_key(path, inner, name)
                    if name.rsplit(".", 1)[-1] == "bias" and key in stored:
                        found[key] = p
    return found


def check_planned_shapes(model: nn.Module, config: LoraConfig, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuses a file `path` (its tensors' `shapes`, from the header) that lacks a factor the config puts on the
    model, or holds it in another shape: computed without allocating, so that a config asking for r = 1,000,000
    where the file holds r = 4 costs nothing. (The adapter's other tensors are checked once injected.)"""
    with warnings.catch_warnings():  # inject, which follows, warns of target names that match nothing
        warnings.simplefilter("ignore")
        targets = find_targets(model, config) if config.target_modules or not config.target_parameters else []
    planned = {}
    for target in targets:
        module = model.get_submodule(target)
        layer = module if isinstance(module, LoraLayer) else wrap_module(module)  # a wrapper holds no factors
        kind = "embedding" if isinstance(layer, LoraEmbedding) else "linear"
        for key, shape in zip(factor_keys(target, kind), layer.factor_shapes(config.rank_for(target)), strict=True):
            planned[key] = tuple(shape)
    _check_expected(shapes, planned, path, only=False)


def check_adapter_shapes(shapes: dict[str, tuple[int, ...]], params: dict[str, nn.Parameter], path: Path) -> None:
    """Refuses a file `path` whose tensors (their `shapes`) are not exactly `params`' keys and shapes."""
    _check_expected(shapes, {key: tuple(p.shape) for key, p in params.items()}, path, only=True)


def _check_expected(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], path: Path, only: bool
) -> None:
    """Refuses file `path`'s tensors (`shapes`) unless every `expected` key is there in its shape and, with `only`,
    no other key is."""
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) the config asks for, e.g. {missing[0]!r}")
    unexpected = [key for key in shapes if key not in expected] if only else []
    if unexpected:
        raise ValueError(f"{path} has {len(unexpected)} tensor(s) no module of the model takes, e.g. {unexpected[0]!r}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(
                f"shape mismatch for {key}: the model expects {shape}, {path.name} has {tuple(shapes[key])}"
            )


def check_adapter_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuses tensors of file `path` that hold NaN or inf."""
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{key} in {path.name} holds NaN or inf")


def check_adapter_tensors(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], path: Path) -> None:
    """Refuses a file `path` whose tensors are not exactly `params`' keys and shapes, or hold NaN or inf."""
    check_adapter_shapes({key: tuple(t.shape) for key, t in tensors.items()}, params, path)
    check_adapter_values(tensors, path)
