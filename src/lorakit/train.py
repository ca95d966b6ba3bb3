"""Fine-tuning a transformers model with LoRA on local data: the loop behind `lorakit finetune`.

    result = lk.train(lk.TrainConfig(model="path/to/model", data="train.jsonl", out="run", steps=200))

One optimizer step = `grad_accum` global micro-batches of `batch_size` examples per process. The loss is
the sum over every predicted token (causal-lm) or example (seq-cls) of the step divided by their global
count, so one process with batch 8 and two with batch 4 take the same step.

Under torchrun each process takes its slice of every global micro-batch and only rank 0 writes files.
Gradients are averaged with DistributedDataParallel; with `fsdp=True` the frozen base model is sharded
with FSDP2 (`fully_shard`) while the small trainable adapter stays whole on every process and its
gradients are all-reduced after each step.

Every `save_every` steps an atomic checkpoint (lorakit.checkpoint) holds the adapter, the optimizer,
the scheduler and the RNG states; the data order is a function of (seed, step), so `resume=True` continues
bit for bit where the newest checkpoint stopped.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from lorakit.atomic import write_text_atomic
from lorakit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.config import LoraConfig
from lorakit.console import make_console, make_progress
from lorakit.data import (
    IGNORE_INDEX,
    Example,
    Task,
    TextDataset,
    collate,
    epoch_order,
    label_values,
    read_jsonl,
    read_records,
)
from lorakit.files import save_adapter
from lorakit.model import KEY_SUFFIXES, adapter_parameters, inject, parameter_counts

__all__ = ["TASKS", "TrainConfig", "TrainResult", "train"]

TASKS = get_args(Task)  # ("causal-lm", "seq-cls")
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything `lk.train` needs. Paths are local directories or files (`model` may also be a hub id);
    see `lorakit finetune --help`."""

    model: str
    data: str
    out: str
    task: Task = "causal-lm"
    text_field: str = "text"
    label_field: str = "label"
    targets: str | list[str] = "all-linear"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 2e-4
    lr_ratio: float = 1.0  # LoRA+: B learns lr_ratio times faster than A
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per process
    grad_accum: int = 1
    max_length: int = 256  # or the model's own limit, where that is smaller
    eval_data: str | None = None
    save_every: int = 0  # 0: only the final adapter
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")

        def whole(v: Any) -> bool:
            return isinstance(v, int)

        checks = [
            (self.r, "--rank", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.alpha, "--alpha", math.isfinite, "a finite number"),
            (self.lr, "--lr", lambda v: 0 < v < math.inf, "a positive number"),
            (self.lr_ratio, "--lr-ratio", lambda v: 0 < v < math.inf, "a positive number"),
            (self.weight_decay, "--weight-decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
            (self.dropout, "--dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            (self.warmup_ratio, "--warmup-ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
            (self.epochs, "--epochs", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.batch_size, "--batch-size", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.grad_accum, "--grad-accum", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.max_length, "--max-length", lambda v: whole(v) and v >= 2, "an integer of at least 2"),
            (self.save_every, "--save-every", lambda v: whole(v) and v >= 0, "an integer >= 0"),
            (self.keep_checkpoints, "--keep-checkpoints", lambda v: whole(v) and v > 0, "a positive integer"),
            (self.seed, "--seed", lambda v: whole(v) and v >= 0, "an integer >= 0"),
        ]
        if self.steps is not None:
            checks.append((self.steps, "--steps", lambda v: whole(v) and v > 0, "a positive integer"))
        for value, flag, ok, what in checks:
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ValueError(f"{flag} must be {what}, got {value!r}")


@dataclass
class TrainResult:
    """What `lk.train` returns: the run's directory, its step count, the last step's training loss (None when
    no step ran, as in a resume of a finished run; not finite if the run diverged), the final eval metrics
    ({} without eval data) and the wall-clock seconds."""

    out: Path
    steps: int
    final_loss: float | None
    eval: dict[str, float]
    seconds: float


# -- processes ----------------------------------------------------------------------------------------


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
        """Ends the process group, once every process has got here. Garbage first: the gloo work that DDP and
        FSDP leave in reference cycles, freed only as the interpreter exits, made torch 2.13 abort a process
        at exit ("terminate called without an active exception", exit -6) in 9 of 55 two-process runs of a
        pure-torch script; collected before the group ends, in none of 30."""
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


# -- model and data --------------------------------------------------------------------------------------


HUB_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")  # "gpt2", "owner/name"


def local_model_dir(name: str) -> Path | None:
    """The local directory `name` stands for, or None where it stands for a model on the Hugging Face hub.

    A name that exists on disk, starts with ".", "/" or "~" (the home directory), or cannot be a hub id
    ("name" or "owner/name" of letters, digits, "_", "-" and ".") is a local path; any other is a hub id.
    Nothing here touches the network.
    """
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        return path
    return None


def load_model_and_tokenizer(path: str, task: str, num_labels: int | None) -> tuple[nn.Module, Any]:
    """A transformers model and its tokenizer from a local directory (or a hub name, where there is network)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local = local_model_dir(path)
    if local is not None and not local.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    if local is not None and not (local / "config.json").is_file():
        raise ValueError(f"{path} is not a transformers model directory (no config.json)")
    source = path if local is None else str(local)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here: LoRA trains it
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # safetensors only: a pytorch_model.bin is a pickle, which can run code when it is read
        if task == "seq-cls":
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, use_safetensors=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
    except Exception as error:  # transformers raises many kinds; each means this directory is bad
        message = " ".join(str(error).split()) or type(error).__name__  # one line, even from a multi-line error
        raise ValueError(f"cannot load the model or tokenizer from {path}: {message}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no pad, eos or unk token to pad batches with")
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, tokenizer


def max_positions(model: nn.Module, tokenizer: Any) -> int | None:
    """The most tokens the model takes in one text: its position table's size, or the tokenizer's limit where
    that is smaller (RoBERTa's table holds two extra rows), or None where neither says."""
    # an unset model_max_length is a huge placeholder (transformers' VERY_LARGE_INTEGER)
    found = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in found if isinstance(n, int) and 0 < n < 10**9]
    return min(limits) if limits else None


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The summed loss of a batch (over predicted tokens for causal-lm, over examples for seq-cls)."""
    if task == "seq-cls":
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    # token t predicts token t + 1
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def loss_count(examples: list[Example], task: str) -> int:
    """How many terms `loss_sum` adds up for these examples: one each (seq-cls), or each token but the first."""
    return len(examples) if task == "seq-cls" else sum(max(len(e.input_ids) - 1, 0) for e in examples)


# -- the loop ------------------------------------------------------------------------------------------


class Trainer:
    """State of one run. `lk.train(config)` builds one and calls `run()`."""

    def __init__(self, config: TrainConfig, console: Console | None = None):
        self.config = config
        self.console = console or make_console(stderr=True)
        self.procs = start_processes()
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} exists and is not a directory")
        # everything that can fail on bad input happens here, before any file is written
        # A new run into an --out with checkpoints: a later --resume would take up the earlier run's as its own.
        # Rank 0 writes, so its --out decides, for every rank at once (each node may have an --out of its own).
        earlier = None if config.resume else latest_checkpoint(self.out)
        if self.procs.all_sum([float(self.procs.main and earlier is not None)])[0]:
            finished = (self.out / "train_config.json").is_file()  # written when a run ends
            raise ValueError(
                f"{self.out} holds checkpoints of an earlier run{f' ({earlier.name})' if earlier else ''}"
                f"{', which finished' if finished else ''}: add --resume to continue it"
                f"{' with more --steps' if finished else ''}, or remove {self.out / 'checkpoints'} (or choose another "
                "--out) to start over"
            )
        label_field = config.label_field if config.task == "seq-cls" else None
        records = read_records(config.data, config.text_field, label_field)
        eval_records = read_records(config.eval_data, config.text_field, label_field) if config.eval_data else None
        labels = label_values(records) if config.task == "seq-cls" else None
        if labels is not None and len(labels) < 2:
            raise ValueError(f"{config.data}: seq-cls needs at least two different labels, and all are {labels[0]!r}")
        torch.manual_seed(config.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model, config.task, len(labels) if labels else None
        )
        limit = max_positions(self.model, self.tokenizer)
        max_length = config.max_length if limit is None else min(config.max_length, limit)
        dataset = partial(TextDataset, tokenizer=self.tokenizer, task=config.task, max_length=max_length, labels=labels)
        self.train_set = dataset(records)
        self.eval_set = dataset(eval_records) if eval_records else None
        self.global_micro = config.batch_size * self.procs.world
        micro_per_epoch = len(self.train_set) // self.global_micro
        self.steps_per_epoch = micro_per_epoch // config.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_set)} examples make no full step of {config.grad_accum} × {self.global_micro} "
                "examples: lower --batch-size or --grad-accum"
            )
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        lora = LoraConfig(
            r=config.r,
            alpha=config.alpha,
            target_modules=config.targets,
            dropout=config.dropout,
            task_type="SEQ_CLS" if config.task == "seq-cls" else "CAUSAL_LM",
        )
        inject(self.model, lora)
        self.model.to(self.procs.device)
        self.optimizer = self._optimizer()
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: linear_schedule(step, warmup, self.total_steps)
        )
        self.start_step = 0
        if config.resume:
            self._resume()
        self.trained = self._distribute()

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; with lr_ratio ≠ 1, LoRA+ (Hayou et al. 2024): the B factors learn lr_ratio times faster.

        Fused: one kernel updates every tensor, where the default steps through them one at a time in Python
        (as transformers' Trainer also defaults to on torch ≥ 2.8)."""
        params = adapter_parameters(self.model)
        b_keys = {k for k in params if k.endswith(tuple(b for _, b in KEY_SUFFIXES.values()))}
        groups = [{"params": [p for k, p in params.items() if k not in b_keys], "lr": self.config.lr}]
        if b_keys:
            b_params = [p for k, p in params.items() if k in b_keys]  # in model order: checkpoints depend on it
            groups.append({"params": b_params, "lr": self.config.lr * self.config.lr_ratio})
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay, fused=True)

    def _resume(self) -> None:
        path = latest_checkpoint(self.out)
        if path is None:
            self.say("--resume: no checkpoint yet, starting from the beginning")
            return
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.procs.rank)
        then, now = state.get("run", {}), self.run_settings()  # no "run": a checkpoint from before they were kept
        if not isinstance(then, dict):
            raise ValueError(f"{path}: its 'run' settings are not a JSON object")
        self.start_step = state["step"]
        if self.start_step > self.total_steps:
            raise ValueError(
                f"{path} is at step {self.start_step}, beyond this run's {self.total_steps} steps: --resume needs "
                f"--steps {self.start_step} or more"
            )
        self._take_this_runs_rates()
        self.say(f"resumed from {path} (step {self.start_step} of {self.total_steps})")
        changed = [f"{key} {then[key]!r} → {value!r}" for key, value in now.items() if then.get(key, value) != value]
        if changed:  # allowed (more steps, another rate), but the user should know
            self.say(
                f"warning: the checkpoint's run had other settings ({'; '.join(changed)}): this run will not "
                "match an uninterrupted one"
            )

    def _take_this_runs_rates(self) -> None:
        """A checkpoint brings back its optimizer's learning rates and weight decay; this run's --lr, --lr-ratio and
        --weight-decay replace them, and the schedule goes on from the checkpoint's step with the new base rates.
        (With the same settings, these are the values the checkpoint held, bit for bit.)"""
        c, groups = self.config, self.optimizer.param_groups
        rates = [c.lr, c.lr * c.lr_ratio][: len(groups)]  # the A (and embedding) group, then the B group
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, rate in zip(groups, rates, strict=True):
            group["initial_lr"], group["lr"], group["weight_decay"] = rate, rate * factor, c.weight_decay
        self.scheduler.base_lrs = rates

    def run_settings(self) -> dict[str, Any]:
        """What sets a run's course from any step on: a resumed run matches an uninterrupted one when these match
        (the adapter's shape, --r and --targets, is checked when the checkpoint loads)."""
        c = self.config
        model_dir = local_model_dir(c.model)
        return {  # paths resolved, so that `run/data.jsonl` and `./run/data.jsonl` are the same data
            "model": c.model if model_dir is None else str(model_dir.resolve()),
            "data": str(Path(c.data).expanduser().resolve()),
            "text_field": c.text_field,
            "label_field": c.label_field,
            "task": c.task,
            "alpha": c.alpha,
            "dropout": c.dropout,
            "lr": c.lr,
            "lr_ratio": c.lr_ratio,
            "weight_decay": c.weight_decay,
            "warmup_ratio": c.warmup_ratio,
            "total_steps": self.total_steps,
            "examples_per_step": c.grad_accum * self.global_micro,
            "max_length": c.max_length,
            "seed": c.seed,
        }

    def _distribute(self) -> nn.Module:
        """The module the loop calls: the model itself, DDP around it, or FSDP2 shards of its frozen base."""
        if self.procs.world == 1:
            return self.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # one order on every process
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            block_names = set(getattr(self.model, "_no_split_modules", None) or [])
            blocks = [m for m in self.model.modules() if type(m).__name__ in block_names]
            for module in blocks:
                fully_shard(module, ignored_params=set(trainable))
            fully_shard(self.model, ignored_params=set(trainable))
            self.say(f"FSDP2: frozen base sharded over {self.procs.world} processes ({len(blocks)} blocks + root)")
            for p in trainable:  # the adapter is replicated: every process starts from rank 0's copy
                dist.broadcast(p.data, src=0)
            return self.model
        device_ids = [self.procs.device.index] if self.procs.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def say(self, message: str) -> None:
        if self.procs.main:
            self.console.print(message)

    def micro_batches(self, step: int) -> list[tuple[dict, int]]:
        """This process's slice of each global micro-batch of optimizer step `step`, with the global count."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_set), self.config.seed, epoch)
        examples, size = self.train_set.examples, self.config.batch_size
        batches = []
        for k in range(self.config.grad_accum):
            start = (in_epoch * self.config.grad_accum + k) * self.global_micro
            whole = [examples[i] for i in order[start : start + self.global_micro].tolist()]
            mine = whole[self.procs.rank * size : (self.procs.rank + 1) * size]
            batch = collate(mine, self.tokenizer.pad_token_id, self.config.task)
            on_device = {key: value.to(self.procs.device) for key, value in batch.items()}
            batches.append((on_device, loss_count(whole, self.config.task)))
        return batches

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns its loss (global mean) and the tokens it processed."""
        self.trained.train()
        batches = self.micro_batches(step)
        total = sum(count for _, count in batches)
        ddp = isinstance(self.trained, nn.parallel.DistributedDataParallel)
        summed, tokens = 0.0, 0
        for k, (batch, _) in enumerate(batches):
            last = k == len(batches) - 1
            sync = self.trained.no_sync() if ddp and not last else nullcontext()
            with sync:
                loss = loss_sum(logits_of(self.trained, batch), batch, self.config.task)
                # DDP averages gradients over processes, so scale by world to get sum / global count
                (loss * (self.procs.world if ddp else 1) / max(total, 1)).backward()
            summed += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if self.config.fsdp and self.procs.world > 1:
            for p in self.model.parameters():
                if p.requires_grad and p.grad is not None:
                    dist.all_reduce(p.grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed, tokens = self.procs.all_sum([summed, float(tokens)])
        return summed / max(total, 1), int(tokens)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and accuracy for seq-cls) on the eval data, each process on its share."""
        if self.eval_set is None:
            return {}
        self.trained.eval()
        n, size = len(self.eval_set), self.config.batch_size
        mine = list(range(self.procs.rank, n, self.procs.world))
        # Every process runs as many forward passes as the one with the most examples (rank 0): under FSDP
        # each forward all-gathers the shards, so a process that stopped early would leave the others waiting.
        # A process out of examples runs a stand-in batch (the first example) and drops its result.
        passes = math.ceil(math.ceil(n / self.procs.world) / size)
        summed = count = correct = 0.0
        pad = self.tokenizer.pad_token_id
        for start in range(0, passes * size, size):
            indices = mine[start : start + size]
            examples = [self.eval_set.examples[i] for i in indices or [0]]
            batch = {k: v.to(self.procs.device) for k, v in collate(examples, pad, self.config.task).items()}
            logits = logits_of(self.trained, batch)  # one forward pass serves the loss and the accuracy
            if not indices:
                continue
            summed += float(loss_sum(logits, batch, self.config.task))
            count += loss_count(examples, self.config.task)
            if self.config.task == "seq-cls":
                correct += float((logits.argmax(-1) == batch["labels"]).sum())
        summed, count, correct = self.procs.all_sum([summed, count, correct])
        result = {"eval_loss": summed / max(count, 1)}
        if self.config.task == "seq-cls":
            result["eval_accuracy"] = correct / n
        return result

    def log(self, record: dict[str, Any]) -> None:
        if self.procs.main:
            self.out.mkdir(parents=True, exist_ok=True)
            # appended, not rewritten atomically: a line torn by a kill is dropped by read_metrics
            with (self.out / METRICS_NAME).open("a", encoding="utf-8") as f:
                f.write(json_line(record))

    def checkpoint(self, step: int) -> None:
        rank_states = cuda_states = None
        if self.procs.world > 1:
            rank_states = self.procs.all_gather(torch.get_rng_state())
            if torch.cuda.is_available():
                cuda_states = self.procs.all_gather(torch.cuda.get_rng_state())  # each process's own device
        if self.procs.main:
            save_checkpoint(
                self.out,
                step,
                self.model,
                self.optimizer,
                self.scheduler,
                {"run": self.run_settings()},
                self.config.keep_checkpoints,
                rank_states,
                cuda_states,
            )
        if self.procs.world > 1:
            dist.barrier()

    def run(self) -> TrainResult:
        started = time.perf_counter()
        config = self.config
        self.say(
            f"training {config.model} ({config.task}) on {len(self.train_set)} examples: {self.total_steps} steps of "
            f"{config.grad_accum} × {self.global_micro} examples on {self.procs.world} process(es)"
        )
        trainable, total = parameter_counts(self.model)
        self.say(f"LoRA r={config.r}, α={config.alpha:g}: {trainable:,} trainable of {total:,} parameters")
        loss, finite_so_far = None, True
        if self.procs.main:
            keep_metrics_until(self.out / METRICS_NAME, self.start_step)
        if self.start_step == 0 and self.eval_set is not None:
            self.log({"step": 0, **self.evaluate()})
        evaluation = None  # the eval of the last step, where it ran with a checkpoint
        with make_progress(self.console, disable=not (config.progress and self.procs.main)) as bar:
            task = bar.add_task("training", total=self.total_steps, completed=self.start_step)
            for step in range(self.start_step, self.total_steps):
                tick = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step's update (A; B: × lr_ratio)
                loss, tokens = self.train_step(step)
                speed = tokens / max(time.perf_counter() - tick, 1e-9)
                done = step + 1
                if not math.isfinite(loss) and finite_so_far:
                    self.say(f"warning: the loss is {loss} at step {done}: the adapter has diverged (try a lower --lr)")
                    finite_so_far = False
                record = {"step": done, "epoch": round(done / self.steps_per_epoch, 4), "loss": loss, "lr": lr}
                self.log({**record, "tokens_per_second": round(speed, 1)})
                bar.update(task, advance=1, description=f"loss {loss:.4f} · {speed:,.0f} tok/s")
                # the last step too, so that a finished run can go on with more --steps from where it ended
                if config.save_every and (done % config.save_every == 0 or done == self.total_steps):
                    evaluation = self.evaluate()
                    if evaluation:
                        self.log({"step": done, **evaluation})
                    self.checkpoint(done)
        if evaluation is None:
            evaluation = self.evaluate()
            if evaluation and self.start_step < self.total_steps:  # resumed at the end: its eval is in the log
                self.log({"step": self.total_steps, **evaluation})
        if evaluation:
            self.say("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
        if self.procs.main:
            save_adapter(self.model, self.out, base_model_name_or_path=config.model)
            write_text_atomic(self.out / "train_config.json", json.dumps(asdict(config), indent=2) + "\n")
            if self.train_set.labels is not None:
                write_text_atomic(self.out / "labels.json", json.dumps(self.train_set.labels) + "\n")
            from lorakit.plots import training_plot  # matplotlib only where a plot is drawn

            training_plot(read_metrics(self.out / METRICS_NAME), self.out / "loss.png")
            self.say(f"adapter saved in {self.out}/ (loss plot: {self.out / 'loss.png'})")
        if self.procs.owns_group:
            self.procs.end()
        elif self.procs.world > 1:
            dist.barrier()  # no process leaves while another still needs the group
        return TrainResult(self.out, self.total_steps, loss, evaluation, time.perf_counter() - started)


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl log, one JSON object a line.

    A last line that is not valid JSON is dropped: it is the one a run killed mid-write left torn. Any
    other bad line is a ValueError naming the file and the line.
    """
    return [record for _, record in read_jsonl(Path(path), drop_torn_last=True)]


def json_line(record: dict[str, Any]) -> str:
    """One line of standard JSON: a NaN or infinite value (a diverged loss) is written as null, since
    Python's NaN / Infinity literals are not JSON and other readers (jq, pandas) reject them."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def keep_metrics_until(path: Path, step: int) -> None:
    """Where a run starts: keep the log lines up to the checkpoint it resumes from (none when it starts from
    step 0), dropping the interrupted or earlier run's tail and any torn last line."""
    if path.is_file():
        kept = [record for record in read_metrics(path) if record.get("step", 0) <= step] if step else []
        write_text_atomic(path, "".join(json_line(record) for record in kept))


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Fine-tunes `config.model` with LoRA on `config.data` and writes a PEFT-format adapter to `config.out`."""
    return Trainer(config, console).run()
