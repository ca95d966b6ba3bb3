"""A run owns its --out: checked before anything is read or loaded, locked for the whole run, cleaned of what a
killed run of its own left there.

    with owned_out(config):
        Trainer(config).run()

- `--out` is not empty, not the model, data, eval data or chat template, nor inside or around any of them, and
  can be written (lorakit.io.outputs): found before the model loads, not after a step has run;
- one run per `--out`: an exclusive OS-level lock (lorakit.io.lock), which a kill -9 releases, so that a second
  run is refused at once with a line naming the first, instead of both writing checkpoints and the log. Under
  torchrun, rank 0, the one process that writes, holds it;
- with the lock held, the temporary files and directories a killed write left in `--out` and its checkpoints are
  this run's own leftovers, and are removed (lorakit.io.atomic.remove_leftovers); a resumed run also prunes the
  checkpoint a kill left unpruned.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from lorakit.io.atomic import remove_leftovers
from lorakit.io.lock import exclusive
from lorakit.io.outputs import check_output
from lorakit.training.checkpoint import prune_checkpoints
from lorakit.training.config import TrainConfig
from lorakit.training.models import local_model_dir

__all__ = ["owned_out"]


@contextmanager
def owned_out(config: TrainConfig) -> Iterator[None]:
    """Checks `config.out` against the run's inputs, and holds it for the block (see the module's docstring).

    Raises:
        ValueError: an empty `out`, one on an input, a file, or one another run holds (naming its pid and host).
        OSError: `out` cannot be written.
    """
    model_dir = local_model_dir(config.model)
    inputs = [
        ("model directory", model_dir),
        ("data", config.data),
        ("eval data", config.eval_data),
        ("chat template", config.chat_template),
    ]
    out = check_output(config.out, inputs)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if _rank() != 0:  # only rank 0 writes
        yield
        return
    with exclusive(out):
        remove_leftovers(out)
        if config.resume:  # a kill between a checkpoint and its pruning left one more than the run keeps
            prune_checkpoints(out, config.keep_checkpoints)
        else:
            remove_leftovers(out / "checkpoints")
        yield


def _rank() -> int:
    """This process's rank: the process group's where one runs, else torchrun's RANK (the group starts later)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
