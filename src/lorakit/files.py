"""Adapter files in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

A lorakit adapter loads with `PeftModel.from_pretrained`, and a directory written by PEFT's
`save_pretrained` loads with `load_adapter`. Files are only ever read as JSON and safetensors: nothing
is unpickled. Saving is atomic (a temporary directory renamed into place), and a load that fails for
any reason leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.config import LoraConfig, matches_target
from lorakit.layers import LoraLinear
from lorakit.model import (
    KEY_SUFFIXES,
    PEFT_PREFIX,
    active_adapters,
    adapter_parameters,
    candidate_modules,
    check_known,
    configs,
    delete_adapter,
    inject,
    lora_layers,
    lora_state_dict,
    mark_trainable,
    module_copies,
    set_adapter,
)
from lorakit.svd_init import PISSA_NITER, is_svd_init, to_plain_lora

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_adapter_tensors",
    "config_from_peft",
    "load_adapter",
    "open_safetensors",
    "peft_config",
    "read_json_object",
    "read_safetensors",
    "save_adapter",
    "write_adapter",
    "write_adapter_files",
    "write_safetensors",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT LoRA options that change what a forward pass computes and that lorakit does not implement:
# loading such a file silently would give wrong outputs, so it is refused.
UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": False,
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "megatron_config": None,
    "use_qalora": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    # PEFT's other layer variants (aLoRA applies the adapter only after its invocation tokens, and so on)
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
}


def peft_config(model: nn.Module, adapter: str, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter's config as PEFT writes it in adapter_config.json."""
    check_known(model, [adapter])
    config = configs(model)[adapter]
    paths = [path for path, layer in lora_layers(model) if adapter in layer.lora_A]
    # SVD inits are written by name: PEFT (and lorakit) re-run them on the original weight when loading
    init = {"kaiming": True, "gaussian": "gaussian", False: False}.get(config.init, config.init)
    return peft_config_dict(
        task_type=config.task_type,
        base_model_name_or_path=base_model_name_or_path,
        r=config.r,
        lora_alpha=config.alpha,
        target_modules=exact_targets(model, paths),
        lora_dropout=config.dropout,
        bias=config.bias,
        use_rslora=config.use_rslora,
        init_lora_weights=init,
        fan_in_fan_out=any(
            isinstance(layer, LoraLinear) and layer.fan_in_fan_out and adapter in layer.lora_A
            for _, layer in lora_layers(model)
        ),
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        modules_to_save=config.modules_to_save,
    )


def peft_config_dict(
    *,
    task_type: str | None,
    base_model_name_or_path: str | None,
    r: int,
    lora_alpha: float,
    target_modules: list[str] | str,
    lora_dropout: float = 0.0,
    bias: str = "none",
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    fan_in_fan_out: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """adapter_config.json's fields, as PEFT writes them for a LoRA adapter (the defaults: PEFT's own)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules,
        "exclude_modules": None,
        "lora_dropout": lora_dropout,
        "bias": bias,
        "use_rslora": use_rslora,
        "init_lora_weights": init_lora_weights,
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "modules_to_save": modules_to_save,
        "inference_mode": True,
    }


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
    """Writes `adapter` as a PEFT adapter directory, atomically. Returns the directory.

    convert_to_lora=True, for adapters initialised from the weight (PiSSA, MiLoRA, OLoRA), writes the
    equivalent plain LoRA of rank 2r relative to the original weight instead, which loads onto an
    untouched base model (as PEFT's `path_initial_model_for_weight_conversion` does).
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
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
                a_key, b_key = KEY_SUFFIXES["linear"]  # SVD inits are for linear layers only
                tensors[f"{PEFT_PREFIX}{path}.{a_key}"], tensors[f"{PEFT_PREFIX}{path}.{b_key}"] = A, B
        config = doubled_rank_config(config)
    write_adapter_files(directory, config, tensors)


def write_adapter_files(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """adapter_model.safetensors and adapter_config.json (PEFT's config dict) into an existing directory."""
    tensors = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    write_safetensors(tensors, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def doubled_rank_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the rank-2r plain LoRA: r and every rank doubled, α scaled so that s is unchanged."""
    alpha_factor = math.sqrt(2) if config["use_rslora"] else 2  # α/√r or α/r stays the same at 2r
    return {
        **config,
        "r": 2 * config["r"],
        "lora_alpha": config["lora_alpha"] * alpha_factor,
        "rank_pattern": {k: 2 * v for k, v in config["rank_pattern"].items()},
        "alpha_pattern": {k: v * alpha_factor for k, v in config["alpha_pattern"].items()},
        "init_lora_weights": True,
    }


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a file that is not valid JSON, or holds no object, is one ValueError naming it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open(path)` for torch tensors, the one way lorakit reads a .safetensors file: a file that cannot be
    read or is not valid safetensors (corrupt, truncated, missing) becomes one ValueError naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A .safetensors file, created with the permissions a plain open() gives (safetensors' own save_file makes
    it readable by its owner alone). Write it inside an atomic_file / atomic_dir."""
    path.write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (see `open_safetensors` for bad files)."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (the handle is no dict: not iterable)


def read_adapter_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    return read_json_object(directory / CONFIG_NAME)


def config_from_peft(raw: dict[str, Any], where: str = CONFIG_NAME) -> LoraConfig:
    """A LoraConfig from the fields of a PEFT adapter_config.json."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type is {raw.get('peft_type')!r}; lorakit reads LoRA adapters only")
    for option, neutral in UNSUPPORTED_PEFT_OPTIONS.items():
        if raw.get(option, neutral) not in (neutral, [], {}):
            raise ValueError(f"{where}: {option}={raw[option]!r} is not supported by lorakit")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init not in ("gaussian", "orthogonal") and not is_svd_init(init):
        raise ValueError(f"{where}: init_lora_weights={init!r} is not supported by lorakit")
    try:
        return LoraConfig(
            r=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            target_modules=raw.get("target_modules"),
            exclude_modules=raw.get("exclude_modules"),
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            init=init if is_svd_init(init) or init == "gaussian" else "kaiming",
            use_rslora=bool(raw.get("use_rslora", False)),
            bias=raw.get("bias", "none"),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            modules_to_save=raw.get("modules_to_save"),
            task_type=raw.get("task_type"),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (directory / name).exists()]
        hint = f" ({pickled[0]} is a pickle, which lorakit never loads)" if pickled else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    return read_safetensors(path)


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", trainable: bool = False
) -> nn.Module:
    """Injects adapter `adapter` as described by a PEFT adapter directory and loads its weights.

    The loaded adapter becomes the active one. With trainable=False its parameters are frozen and the other
    adapters' parameters that were training still train (as with PEFT's is_trainable=False); with
    trainable=True it alone trains. Every
    check (missing or corrupt file, missing or unknown key, shape mismatch, NaN) runs before any weight is
    written, and on any error the model is left exactly as it was.
    """
    directory = Path(directory)
    config = config_from_peft(read_adapter_config(directory), str(directory / CONFIG_NAME))
    tensors = read_adapter_weights(directory)
    if adapter in configs(model):
        raise ValueError(f"the model already has an adapter named {adapter!r}; delete it first or pick another name")
    active = active_adapters(model)
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
        params.update(saved_base_weights(model, adapter, tensors))
        params.update(saved_wrapper_biases(model, adapter, tensors))
        check_adapter_tensors(tensors, params, directory / WEIGHTS_NAME)
    except BaseException:
        try:
            if adapter in configs(model):
                delete_adapter(model, adapter)
            set_adapter(model, active)
        finally:
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


def saved_base_weights(model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """PEFT saves the whole base weight of an adapted `embed_tokens` / `lm_head` beside its factors, as
    `<path>.base_layer.weight`; such keys load into the base layer."""
    found = {}
    for path, layer in lora_layers(model):
        key = f"{PEFT_PREFIX}{path}.base_layer.weight"
        if adapter in layer.lora_A and key in tensors:
            found[key] = layer.base.weight
    return found


def saved_wrapper_biases(model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """PEFT with bias="all" also saves each modules_to_save wrapper's biases under its inner names:
    `<path>.modules_to_save.<name>` (the copy's again, beside `<path>.<name>`) and `<path>.original_module.<name>`
    (the original module's); such keys load there."""
    found = {}
    for path, copies in module_copies(model):
        if adapter in copies.copies:
            for inner, module in (("modules_to_save", copies.copies[adapter]), ("original_module", copies.original)):
                for name, p in module.named_parameters():
                    key = f"{PEFT_PREFIX}{path}.{inner}.{name}"
                    if name.rsplit(".", 1)[-1] == "bias" and key in tensors:
                        found[key] = p
    return found


def check_adapter_tensors(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], path: Path) -> None:
    """Refuses a file `path` whose tensors are not exactly `params`' keys and shapes, or hold NaN or inf."""
    missing = [key for key in params if key not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) the config asks for, e.g. {missing[0]!r}")
    unexpected = [key for key in tensors if key not in params]
    if unexpected:
        raise ValueError(f"{path} has {len(unexpected)} tensor(s) no module of the model takes, e.g. {unexpected[0]!r}")
    for key, p in params.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(
                f"shape mismatch for {key}: the model expects {tuple(p.shape)}, {path.name} has "
                f"{tuple(tensors[key].shape)}"
            )
        if not torch.isfinite(tensors[key]).all():
            raise ValueError(f"{key} in {path.name} holds NaN or inf")
