"""The processes of a run: one, or several under torchrun (one process group, nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Processes", "fully_shard_api", "start_processes"]


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's `tensor` (same shape and dtype on each), in rank order, on the CPU."""
        local = tensor.to(self.device)  # nccl moves only device tensors
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        return [t.cpu() for t in gathered]

    def end(self) -> None:
        """Ends the process group, once every process has got here.

        Garbage first: the gloo work that DDP and FSDP leave in reference cycles, freed only as the interpreter
        exits, can make torch abort a process at exit (bench/NOTES.md).
        """
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def start_processes() -> Processes:
    """torchrun's environment → one process group (nccl on GPU, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Processes(rank, world, device, owns_group)


def fully_shard_api() -> Callable[..., Any]:
    """FSDP2's `fully_shard`, public from torch 2.6 on (lorakit's floor); on an older torch, one ValueError
    that says what --fsdp needs, instead of an import traceback."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        message = f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}"
        raise ValueError(message) from None
    return fully_shard
