"""Hugging Face PEFT's LoRA file format, in one place: what a directory holds and what each key means.

    adapter_config.json          PEFT's LoraConfig as JSON (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    the tensors, under the keys below

Keys are `base_model.model.<module path>.<what>`:

    <path>.lora_A.weight / .lora_B.weight           factors of a Linear, Conv1D or Conv layer
    <path>.lora_embedding_A / .lora_embedding_B     factors of an Embedding (no ".weight")
    <path>.<param>                                  a modules_to_save copy's parameters, under the module's path
    <path>.base_layer.bias / <path>.bias            biases trained with bias="all" / "lora_only"
    <path>.base_layer.weight                        the whole base weight PEFT saves beside an adapted embedding
    <path>.modules_to_save.<b> / .original_module.<b>   bias="all": a modules_to_save wrapper's biases again

The options of PEFT's LoraConfig that lorakit does not implement are refused on reading
(UNSUPPORTED_PEFT_OPTIONS): loading such a file silently would give other outputs than PEFT's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lorakit.engine.config import LoraConfig, is_svd_init
from lorakit.io.files import read_json_object, read_safetensors, write_safetensors

__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "UNSUPPORTED_PEFT_OPTIONS",
    "WEIGHTS_NAME",
    "a_key_parts",
    "base_weight_key",
    "bias_key",
    "config_from_peft",
    "config_to_peft",
    "doubled_rank_config",
    "factor_keys",
    "is_b_factor_key",
    "is_factor_key",
    "module_key",
    "peft_config_dict",
    "read_adapter_config",
    "read_adapter_weights",
    "wrapper_key",
    "write_adapter_files",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# the endings of each kind of layer's factor keys, (A, B): conv layers' are the linear ones
KEY_SUFFIXES = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}

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


# -- keys -------------------------------------------------------------------------------------------------


def module_key(path: str, name: str | None = None) -> str:
    """The key of module `path` itself (`name` None) or of its parameter `name`."""
    return f"{PEFT_PREFIX}{path}" if name is None else f"{PEFT_PREFIX}{path}.{name}"


def factor_keys(path: str, kind: str) -> tuple[str, str]:
    """The keys of layer `path`'s A and B factors; `kind` is "linear" (Linear, Conv1D, Conv) or "embedding"."""
    a_suffix, b_suffix = KEY_SUFFIXES[kind]
    return module_key(path, a_suffix), module_key(path, b_suffix)


def bias_key(path: str, wrapped: bool) -> str:
    """The key of the bias of layer `path` trained with bias="all"/"lora_only": `base_layer.bias` where this
    adapter wraps the layer, the plain `bias` where it does not."""
    return module_key(path, "base_layer.bias" if wrapped else "bias")


def base_weight_key(path: str) -> str:
    """The key under which PEFT saves the whole base weight of an adapted `embed_tokens` / `lm_head`."""
    return module_key(path, "base_layer.weight")


def wrapper_key(path: str, inner: str, name: str) -> str:
    """A modules_to_save wrapper's inner parameter: `inner` is "modules_to_save" (the copy) or "original_module"."""
    return module_key(path, f"{inner}.{name}")


def a_key_parts(key: str) -> tuple[str, str, str] | None:
    """(layer kind, layer path, its B factor's key) where `key` is an A factor's key; None otherwise."""
    for kind, (a_suffix, b_suffix) in KEY_SUFFIXES.items():
        if key.endswith("." + a_suffix):
            stem = key[: -len(a_suffix) - 1]
            return kind, stem.removeprefix(PEFT_PREFIX), f"{stem}.{b_suffix}"
    return None


def is_factor_key(key: str) -> bool:
    """Whether `key` is an A or B factor's key (of any layer kind)."""
    return key.endswith(tuple(suffix for pair in KEY_SUFFIXES.values() for suffix in pair))


def is_b_factor_key(key: str) -> bool:
    """Whether `key` is a B factor's key (of any layer kind)."""
    return key.endswith(tuple(b for _, b in KEY_SUFFIXES.values()))


# -- adapter_config.json ----------------------------------------------------------------------------------


def config_to_peft(
    config: LoraConfig, target_modules: list[str] | str, fan_in_fan_out: bool, base_model_name_or_path: str | None
) -> dict[str, Any]:
    """adapter_config.json's fields for `config`, with the exact `target_modules` it was applied to."""
    # SVD inits are written by name: PEFT (and lorakit) re-run them on the original weight when loading
    init = {"kaiming": True, "gaussian": "gaussian", False: False}.get(config.init, config.init)
    return peft_config_dict(
        task_type=config.task_type,
        base_model_name_or_path=base_model_name_or_path,
        r=config.r,
        lora_alpha=config.alpha,
        target_modules=target_modules,
        lora_dropout=config.dropout,
        bias=config.bias,
        use_rslora=config.use_rslora,
        init_lora_weights=init,
        fan_in_fan_out=fan_in_fan_out,
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


# -- the directory ----------------------------------------------------------------------------------------


def write_adapter_files(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """adapter_model.safetensors and adapter_config.json (PEFT's config dict) into an existing directory."""
    tensors = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    write_safetensors(tensors, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The JSON object in `directory`/adapter_config.json; a missing directory or file is FileNotFoundError."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    return read_json_object(directory / CONFIG_NAME)


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `directory`/adapter_model.safetensors; a pickled adapter_model.bin is named, never read."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (directory / name).exists()]
        hint = f" ({pickled[0]} is a pickle, which lorakit never loads)" if pickled else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    return read_safetensors(path)
