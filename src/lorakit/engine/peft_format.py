"""Hugging Face PEFT's LoRA file format, in one place: what a directory holds and what each key means.

    adapter_config.json          PEFT's LoraConfig as JSON (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    the tensors, under the keys below

Keys are `base_model.model.<module path>.<what>`:

    <path>.lora_A.weight / .lora_B.weight           factors of a Linear, Conv1D or Conv layer
    <path>.lora_embedding_A / .lora_embedding_B     factors of an Embedding (no ".weight")
    <path>.lora_B.bias                              B's bias, with lora_bias
    <path>.token_adapter.trainable_tokens_delta     trained token rows (trainable_token_indices), n × dim
    <path>.base_layer.<...>                         a LoRA layer inside another: MultiheadAttention's out_proj,
                                                    a module's further target_parameters
    <path>.lora_magnitude_vector                    DoRA's magnitude, (out,); Embedding (dim,); conv (1, out, 1…)
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
from lorakit.engine.peft_types import check_peft_types
from lorakit.io.files import open_safetensors, read_json_object, read_safetensors, write_safetensors

__all__ = [
    "CONFIG_NAME",
    "FLOAT_TYPES",
    "PEFT_PREFIX",
    "UNSUPPORTED_PEFT_OPTIONS",
    "WEIGHTS_NAME",
    "a_key_parts",
    "base_weight_key",
    "bias_key",
    "check_adapter_output",
    "config_from_peft",
    "config_to_peft",
    "doubled_rank_config",
    "factor_keys",
    "factor_partner",
    "is_b_factor_key",
    "is_factor_key",
    "lora_bias_key",
    "magnitude_key",
    "module_key",
    "peft_config_dict",
    "read_adapter_config",
    "read_adapter_header",
    "read_adapter_weights",
    "token_rows_key",
    "weights_path",
    "wrapper_key",
    "write_adapter_files",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# the endings of each kind of layer's factor keys, (A, B): conv layers' are the linear ones
# the floating-point types an adapter's tensors may have, as torch and the safetensors header name them
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STORED_FLOAT_TYPES = ("F16", "BF16", "F32", "F64")
KEY_SUFFIXES = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}

# PEFT LoRA options that change what a forward pass computes and that lorakit does not implement:
# loading such a file silently would give wrong outputs, so it is refused.
UNSUPPORTED_PEFT_OPTIONS = {
    "layers_to_transform": None,
    "layer_replication": None,
    "megatron_config": None,
    "use_qalora": False,
    # ties the adapter of an embedding (modules_to_save or LoRA) to its tied output head as well
    "ensure_weight_tying": False,
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


def lora_bias_key(path: str) -> str:
    """The key of layer `path`'s B bias (lora_bias)."""
    return module_key(path, "lora_B.bias")


def token_rows_key(path: str) -> str:
    """The key of module `path`'s trained token rows (trainable_token_indices)."""
    return module_key(path, "token_adapter.trainable_tokens_delta")


def magnitude_key(path: str) -> str:
    """The key of layer `path`'s DoRA magnitude."""
    return module_key(path, "lora_magnitude_vector")


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
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
        trainable_token_indices=config.trainable_token_indices,
        target_parameters=config.target_parameters,
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
    use_dora: bool = False,
    lora_bias: bool = False,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
    target_parameters: list[str] | None = None,
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
        "use_dora": use_dora,
        "lora_bias": lora_bias,
        "trainable_token_indices": trainable_token_indices,
        "target_parameters": target_parameters,
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
    check_peft_types(raw, where)  # text for a flag, a list of numbers for targets, ...: refused before any use
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
            use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            trainable_token_indices=raw.get("trainable_token_indices") or None,
            target_parameters=raw.get("target_parameters") or None,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


# -- the directory ----------------------------------------------------------------------------------------


def write_adapter_files(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """adapter_model.safetensors and adapter_config.json (PEFT's config dict) into an existing directory, the
    tensors checked first (`check_adapter_output`): a refused adapter writes nothing."""
    check_adapter_output(tensors)
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


def weights_path(directory: Path) -> Path:
    """`directory`/adapter_model.safetensors; where it is missing, a FileNotFoundError that names a pickled
    adapter_model.bin found instead (never read)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (directory / name).exists()]
        hint = f" ({pickled[0]} is a pickle, which lorakit never loads)" if pickled else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    return path


def read_adapter_header(directory: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of `directory`/adapter_model.safetensors, read from its header alone: nothing is
    allocated, so that shapes can be checked against the config and the model before anything is.

    Raises:
        FileNotFoundError: no weights file (see `weights_path`).
        ValueError: a file that is not valid safetensors; a tensor that is not float16, bfloat16, float32 or
            float64 (integers, booleans, complex numbers, float8), named.
    """
    path = weights_path(directory)
    shapes = {}
    with open_safetensors(path) as f:
        for key in f.keys():  # noqa: SIM118 (the handle is no dict: not iterable)
            tensor = f.get_slice(key)
            if tensor.get_dtype() not in STORED_FLOAT_TYPES:
                raise ValueError(
                    f"{path.name}: {key} is of type {tensor.get_dtype()}; an adapter's tensors are float16, "
                    "bfloat16, float32 or float64"
                )
            shapes[key] = tuple(tensor.get_shape())
    return shapes


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `directory`/adapter_model.safetensors, of a floating-point type lorakit computes in (see
    `read_adapter_header`); a pickled adapter_model.bin is named, never read."""
    read_adapter_header(directory)
    return read_safetensors(weights_path(directory))


def factor_partner(key: str) -> str | None:
    """The key of the other factor of the same layer (B's for an A key, A's for a B key); None for a key that
    is no factor."""
    for a_suffix, b_suffix in KEY_SUFFIXES.values():
        for mine, other in ((a_suffix, b_suffix), (b_suffix, a_suffix)):
            if key.endswith("." + mine):
                return key[: -len(mine)] + other
    return None


def check_adapter_output(tensors: dict[str, torch.Tensor]) -> None:
    """Refuses tensors that would make an adapter file no reader can use, before anything is written: a tensor
    that is not float16, bfloat16, float32 or float64, or holds NaN or inf; a factor without its partner (an A
    without its B, or the reverse), or with a dimension of size 0.

    Raises:
        ValueError: the first such tensor, naming its layer.
    """
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if t.dtype not in FLOAT_TYPES:
            raise ValueError(f"not writing the adapter: {name} is {t.dtype}, not float16, bfloat16, float32 or float64")
        partner = factor_partner(key)
        if partner is not None and partner not in tensors:
            raise ValueError(f"not writing the adapter: {name} has no {partner.removeprefix(PEFT_PREFIX)} beside it")
        if partner is not None and 0 in t.shape:
            raise ValueError(f"not writing the adapter: {name} has shape {tuple(t.shape)}, with no elements")
        if t.device.type == "meta":
            raise ValueError(f"not writing the adapter: {name} is on the meta device, which holds no values")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"not writing the adapter: {name} holds NaN or inf")
