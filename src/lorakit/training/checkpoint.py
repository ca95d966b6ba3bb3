"""Training checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

    OUT/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's format
        optimizer.safetensors                            optimizer state tensors and the RNG states
        trainer_state.json                               step, optimizer hyper-parameters, scheduler state

A checkpoint directory appears complete or not at all (lorakit.io.atomic), an old one is renamed away before it
is deleted, and only a directory that holds all four files counts as one, so the newest one present is always
usable: a kill at any point of a save or of the pruning leaves hidden leftovers, which the next save removes.
Nothing is pickled: tensors go to safetensors and everything else to JSON.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.engine.adapter_files import check_adapter_tensors, write_adapter
from lorakit.engine.model import adapter_parameters
from lorakit.engine.peft_format import CONFIG_NAME, WEIGHTS_NAME
from lorakit.io.atomic import atomic_dir, remove_leftovers, remove_tree
from lorakit.io.files import read_json_object, read_safetensors, write_safetensors

__all__ = ["checkpoint_dirs", "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "save_checkpoint"]

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "optimizer.safetensors"
OWN_FILES = (STATE_NAME, TENSORS_NAME)  # beside the adapter's two files
CUDA_DEVICE_KEY = re.compile(r"rng\.cuda\.\d+")  # one per device, as the saving process saw them


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints in `out` (each of their files there), oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("step-*")
        if p.name[5:].isdigit() and all((p / name).is_file() for name in (WEIGHTS_NAME, CONFIG_NAME, *OWN_FILES))
    ]
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
    rank_rng_states: list[torch.Tensor] | None = None,
    rank_cuda_rng_states: list[torch.Tensor] | None = None,
) -> Path:
    """Writes checkpoint `step` (after `step` optimizer steps) and prunes all but the newest `keep`.

    Under torchrun, `rank_rng_states` holds every process's CPU generator state and `rank_cuda_rng_states`
    the state of each process's own CUDA device, in rank order (each draws its own dropout masks, as many as
    its batch shapes ask for): `load_checkpoint(..., rank=r)` gives process r its own back."""
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for rank, state in enumerate(rank_rng_states or []):
        tensors[f"rng.rank.{rank}"] = state
    for rank, state in enumerate(rank_cuda_rng_states or []):
        tensors[f"rng.cuda.rank.{rank}"] = state
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
        write_safetensors(tensors, tmp / TENSORS_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    prune_checkpoints(out, keep)
    return path


def prune_checkpoints(out: Path, keep: int) -> None:
    """Removes all but the newest `keep` checkpoints in `out`, and what killed saves and removals left there.

    Each old checkpoint is renamed away first: a kill mid-deletion leaves a leftover, never half a checkpoint.
    """
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        remove_tree(old)
    remove_leftovers(Path(out) / "checkpoints")  # as large as a checkpoint each


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> dict[str, Any]:
    """Restores adapter weights, optimizer, scheduler and RNG states from `path`; returns its JSON state.
    Under torchrun, process `rank` takes its own CPU and CUDA generator states where the checkpoint holds
    them per rank.

    Every file is read and checked before anything is restored: a damaged checkpoint, or one of another
    run, is one ValueError naming the file, and leaves the model, optimizer, scheduler and RNGs as they were.
    """
    path = Path(path)
    state = read_json_object(path / STATE_NAME)
    tensors = read_safetensors(path / TENSORS_NAME)
    weights = read_safetensors(path / WEIGHTS_NAME)
    params = adapter_parameters(model)
    try:
        check_adapter_tensors(weights, params, path / WEIGHTS_NAME)
    except ValueError as error:
        raise ValueError(f"checkpoint {path} does not fit this run (other --r, targets or task?): {error}") from None
    try:
        if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"step {state['step']!r} is not a step count")
        optimizer_state = _optimizer_state(state, tensors, optimizer)
        _check_like(optimizer_state["param_groups"], optimizer.state_dict()["param_groups"], "param_groups")
        scheduler_state = state["scheduler"]
        _check_like(scheduler_state, scheduler.state_dict(), "scheduler")
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ValueError(f"{path / STATE_NAME} is not a usable checkpoint state: {_describe(error)}") from None
    try:
        cpu_rng, cuda_rngs, own_cuda_rng = _rng_states(tensors, rank)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path / TENSORS_NAME} holds no usable RNG states: {_describe(error)}") from None
    # everything is read and checked: restore, and should torch still refuse a state, undo what was restored
    weights_before = {key: p.detach().clone() for key, p in params.items()}
    optimizer_before, scheduler_before = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    try:
        _restore(params, weights, optimizer, optimizer_state, scheduler, scheduler_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        _restore(params, weights_before, optimizer, optimizer_before, scheduler, scheduler_before)
        raise ValueError(f"{path / STATE_NAME} is not a usable checkpoint state: {_describe(error)}") from None
    torch.set_rng_state(cpu_rng)
    if torch.cuda.is_available():
        if own_cuda_rng is not None:
            torch.cuda.set_rng_state(own_cuda_rng)  # this process's device (torchrun: one device each)
        elif len(cuda_rngs) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rngs)
    return state


def _restore(
    params: dict[str, nn.Parameter],
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    optimizer_state: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scheduler_state: dict[str, Any],
) -> None:
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(weights[key])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)


def _describe(error: Exception) -> str:
    return f"no {error}" if isinstance(error, KeyError) else str(error)


def _check_like(saved: Any, current: Any, where: str) -> None:
    """Refuses saved state (JSON) whose values differ from this run's own in kind: a list of another length,
    text for a number, and so on, which torch would take and then fail on at the first step. Keys only one
    side has are left to torch (another version of it may save a key more or less)."""
    if isinstance(current, dict) and isinstance(saved, dict):
        for key in current.keys() & saved.keys():
            _check_like(saved[key], current[key], f"{where}.{key}")
    elif isinstance(current, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(current):
            raise ValueError(f"{where} is {saved!r}, where this run has {len(current)} values")
        for i, (a, b) in enumerate(zip(saved, current, strict=True)):
            _check_like(a, b, f"{where}[{i}]")
    elif isinstance(current, dict | bool | str):
        if type(saved) is not type(current):
            raise ValueError(f"{where} is {saved!r}, where this run has {current!r}")
    elif isinstance(current, int | float) and (isinstance(saved, bool) or not isinstance(saved, int | float)):
        raise ValueError(f"{where} is {saved!r}, not a number")


def _optimizer_state(
    state: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer state dict saved in (state, tensors), refused unless it fits `optimizer`'s parameters."""
    groups = state["param_groups"]
    saved_sizes = [len(group["params"]) for group in groups]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(f"parameter groups of sizes {saved_sizes}, this run's optimizer has {sizes}")
    params = dict(
        zip(
            [index for group in groups for index in group["params"]],
            [p for group in optimizer.param_groups for p in group["params"]],
            strict=True,
        )
    )
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            p = params.get(int(index))
            if p is None or (value.dim() > 0 and value.shape != p.shape):
                raise ValueError(f"{key} (shape {tuple(value.shape)}) fits no parameter of this run's optimizer")
            per_param.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer_scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    return {"state": per_param, "param_groups": groups}


def _rng_states(
    tensors: dict[str, torch.Tensor], rank: int
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Process `rank`'s CPU generator state (the saving process's where there is none per rank), every CUDA
    device's state as the saving process saw them, in device order, and process `rank`'s own CUDA device's
    state where the checkpoint holds one per rank."""
    key = f"rng.rank.{rank}" if f"rng.rank.{rank}" in tensors else "rng.torch"
    cpu = tensors[key]
    if cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise ValueError(f"{key} is a {cpu.dtype} tensor of shape {tuple(cpu.shape)}, not a CPU generator state")
    try:  # bytes of the right size that are no Mersenne Twister state: torch refuses them, tried on a scratch generator
        torch.Generator().set_state(cpu)
    except RuntimeError as error:
        raise ValueError(f"{key} is not a valid CPU generator state ({error})") from None
    devices = {int(key.rsplit(".", 1)[1]): value for key, value in tensors.items() if CUDA_DEVICE_KEY.fullmatch(key)}
    own = tensors.get(f"rng.cuda.rank.{rank}")
    if own is not None and own.dtype != torch.uint8:
        raise ValueError(f"rng.cuda.rank.{rank} is a {own.dtype} tensor, not a CUDA generator state")
    return cpu, [devices[i] for i in sorted(devices)], own  # numerically: device 10 after device 2
