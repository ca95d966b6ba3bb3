"""lorakit: LoRA for PyTorch.

import lorakit as lk

model = lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
...train...
lk.save_adapter(model, "my-adapter")          # PEFT's file format
lk.load_adapter(fresh_model, "my-adapter")

lk.lowrank.rank(W)                            # the low-rank toolkit

Each name is imported from its module on first use (PEP 562), so that `import lorakit` and the `lorakit`
command start without torch, transformers or matplotlib: `lorakit --help` answers at once, and each command
imports only what it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from lorakit import lowrank
    from lorakit.engine.adapter_files import load_adapter, save_adapter
    from lorakit.engine.config import LoraConfig
    from lorakit.engine.model import (
        BASE,
        adapter_names,
        delete_adapter,
        disabled,
        forward_per_sample,
        inject,
        lora_state_dict,
        merge,
        merge_and_unload,
        parameter_counts,
        set_adapter,
        unload,
        unmerge,
    )
    from lorakit.engine.parametrize import LoRAParametrization
    from lorakit.study.intrinsic import intrinsic_dimension
    from lorakit.tools.extract import extract
    from lorakit.tools.inspect import compare, inspect
    from lorakit.tools.resize import combine, resize
    from lorakit.tools.stored import AdapterState
    from lorakit.training.config import TrainConfig, TrainResult
    from lorakit.training.loop import train

__all__ = [
    "BASE",
    "AdapterState",
    "LoRAParametrization",
    "LoraConfig",
    "TrainConfig",
    "TrainResult",
    "adapter_names",
    "combine",
    "compare",
    "delete_adapter",
    "disabled",
    "extract",
    "forward_per_sample",
    "inject",
    "inspect",
    "intrinsic_dimension",
    "load_adapter",
    "lora_state_dict",
    "lowrank",
    "merge",
    "merge_and_unload",
    "parameter_counts",
    "resize",
    "save_adapter",
    "set_adapter",
    "train",
    "unload",
    "unmerge",
]
__version__ = "0.1.0"

# where each public name lives ("lowrank" is a module itself)
_MODULES = {
    "lorakit.engine.adapter_files": ("load_adapter", "save_adapter"),
    "lorakit.engine.config": ("LoraConfig",),
    "lorakit.engine.model": (
        "BASE",
        "adapter_names",
        "delete_adapter",
        "disabled",
        "forward_per_sample",
        "inject",
        "lora_state_dict",
        "merge",
        "merge_and_unload",
        "parameter_counts",
        "set_adapter",
        "unload",
        "unmerge",
    ),
    "lorakit.engine.parametrize": ("LoRAParametrization",),
    "lorakit.tools.extract": ("extract",),
    "lorakit.tools.inspect": ("compare", "inspect"),
    "lorakit.tools.resize": ("combine", "resize"),
    "lorakit.tools.stored": ("AdapterState",),
    "lorakit.training.config": ("TrainConfig", "TrainResult"),
    "lorakit.training.loop": ("train",),
    "lorakit.study.intrinsic": ("intrinsic_dimension",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names} | {"lowrank": "lorakit.lowrank"}


def __getattr__(name: str) -> Any:
    """`lk.NAME`: imported from its module the first time, then kept here like any module attribute."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if name == "lowrank" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
