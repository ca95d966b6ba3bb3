"""lorakit: LoRA for PyTorch.

import lorakit as lk

model = lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
...train...
lk.save_adapter(model, "my-adapter")          # PEFT's file format
lk.load_adapter(fresh_model, "my-adapter")

lk.lowrank.rank(W)                            # the low-rank toolkit
"""

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
