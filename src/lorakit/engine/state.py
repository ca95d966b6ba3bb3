"""lorakit's bookkeeping on a model: one small object under `model.__dict__["lorakit"]`.

The layers carry their own adapters (lorakit.engine.layers); what belongs to the model as a whole is which
adapters it has (their configs, in the order they were added), which are active, and whether it is inside
`lk.disabled(model)`. A plain model has no entry at all: queries read it without writing, and removing the
last adapter removes the entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.engine.config import LoraConfig

__all__ = ["ModelState", "drop_state", "read_state", "restore_state", "snapshot_state", "write_state"]

KEY = "lorakit"  # in model.__dict__: not a submodule, parameter or buffer, so state_dict() never sees it


@dataclass
class ModelState:
    """Which adapters a model has (by name, in the order added), which are active, how deep in `disabled`."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled_depth: int = 0


def read_state(model: nn.Module) -> ModelState:
    """The model's state for reading; a plain model's is empty, and nothing is stored on it."""
    return model.__dict__.get(KEY) or ModelState()


def write_state(model: nn.Module) -> ModelState:
    """The model's state for changing, created on a plain model."""
    return model.__dict__.setdefault(KEY, ModelState())


def drop_state(model: nn.Module) -> None:
    """Removes lorakit's entry: the model is a plain one again."""
    model.__dict__.pop(KEY, None)


def snapshot_state(model: nn.Module) -> ModelState | None:
    """A copy of the model's state (None for a plain model), for `restore_state` after a failed change."""
    state = model.__dict__.get(KEY)
    return None if state is None else ModelState(dict(state.configs), list(state.active), state.disabled_depth)


def restore_state(model: nn.Module, saved: ModelState | None) -> None:
    """Puts back a `snapshot_state`: exactly the entry the model had, or none."""
    if saved is None:
        drop_state(model)
    else:
        model.__dict__[KEY] = saved
