"""Training checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

    OUT/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's format
        optimizer.safetensors                            optimizer state tensors and the RNG states
        trainer_state.json                               step, optimizer hyper-parameters, scheduler state

A checkpoint directory appears complete or not at all (lorakit.atomic), so the newest one present is
always usable. Nothing is pickled: tensors go to safetensors and everything else to JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.files import WEIGHTS_NAME, check_adapter_tensors, write_adapter
from lorakit.model import adapter_parameters

__all__ = ["checkpoint_dirs", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "optimizer.safetensors"


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_NAME).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Writes checkpoint `step` (after `step` optimizer steps) and prunes all but the newest `keep`."""
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in optimizer_state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    state = {
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        **extra,
    }
    path = Path(out) / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(path) as tmp:
        write_adapter(model, tmp)
        save_file(tensors, tmp / TENSORS_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restores adapter weights, optimizer, scheduler and RNG states from `path`; returns its JSON state."""
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    tensors = load_file(path / TENSORS_NAME)
    weights = load_file(path / WEIGHTS_NAME)
    params = adapter_parameters(model)
    try:
        check_adapter_tensors(weights, params, path / WEIGHTS_NAME)
    except ValueError as error:
        raise ValueError(f"checkpoint {path} does not fit this run (other --r, targets or task?): {error}") from None
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(weights[key])
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer_scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return state
