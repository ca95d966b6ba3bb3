"""The JSON types of adapter_config.json's fields, as PEFT writes them, checked before any value is used.

A config from outside may hold `"use_rslora": "false"` (text, which Python reads as true), `"lora_dropout": "0.1"`,
a list of numbers for `target_modules`, or `"r": true`: each is refused here with one ValueError naming the field
and what it must be, instead of being taken for something else or failing later with a TypeError. Fields lorakit
does not know (those of a newer PEFT) are left to `config_from_peft`, which refuses the ones that change outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PEFT_FIELD_TYPES", "check_peft_types"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _either(*checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: any(check(value) for check in checks)


def _mapping(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and all(check(item) for item in value.values())


_flag = (lambda value: isinstance(value, bool), "true or false")
_names = (_optional(_either(_text, _texts)), "a list of module names, a regular expression or null")

# field: (check, what it must be). Values are checked further by LoraConfig (ranges, regular expressions).
PEFT_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (_text, "text"),
    "task_type": (_optional(_text), "text or null"),
    "base_model_name_or_path": (_optional(_text), "text or null"),
    "r": (_integer, "an integer"),
    "lora_alpha": (_number, "a number"),
    "lora_dropout": (_optional(_number), "a number or null"),
    "use_rslora": _flag,
    "fan_in_fan_out": _flag,
    "inference_mode": _flag,
    "use_dora": _flag,
    "lora_bias": _flag,
    "bias": (_text, "text"),
    "init_lora_weights": (_either(lambda value: isinstance(value, bool), _text), "true, false or the name of an init"),
    "target_modules": _names,
    "exclude_modules": _names,
    "modules_to_save": (_optional(_texts), "a list of module names or null"),
    "rank_pattern": (_optional(_mapping(_integer)), "an object of patterns to integers"),
    "alpha_pattern": (_optional(_mapping(_number)), "an object of patterns to numbers"),
    "target_parameters": (_optional(_texts), "a list of parameter names or null"),
    "layers_to_transform": (
        _optional(_either(_integer, lambda v: isinstance(v, list) and all(map(_integer, v)))),
        "an integer, a list of integers or null",
    ),
}


def check_peft_types(raw: dict[str, Any], where: str) -> None:
    """Refuses an adapter_config.json (`raw`, read from `where`) whose known fields are not of PEFT's types.

    Raises:
        ValueError: the first field of the wrong type, named with what it must be and what it is.
    """
    for name, (check, what) in PEFT_FIELD_TYPES.items():
        if name in raw and not check(raw[name]):
            value = raw[name]
            shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:77]}..."
            raise ValueError(f"{where}: {name} must be {what}, got {shown}")
