"""Fine-tuning a transformers model with LoRA on local data: the loop behind `lorakit finetune`.

    result = lk.train(lk.TrainConfig(model="path/to/model", data="train.jsonl", out="run", steps=200))

One optimizer step = `grad_accum` global micro-batches of `batch_size` examples per process. The loss is
the sum over every predicted token (causal-lm) or example (seq-cls) of the step divided by their global
count, so one process with batch 8 and two with batch 4 take the same step.

Under torchrun each process takes its slice of every global micro-batch and only rank 0 writes files.
Gradients are averaged with DistributedDataParallel; with `fsdp=True` the frozen base model is sharded
with FSDP2 (`fully_shard`) while the small trainable adapter stays whole on every process and its
gradients are all-reduced after each step.

Every `save_every` steps an atomic checkpoint (lorakit.training.checkpoint) holds the adapter, the optimizer,
the scheduler and the RNG states; the data order is a function of (seed, step), so `resume=True` continues
bit for bit where the newest checkpoint stopped.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from lorakit.engine.adapter_files import save_adapter
from lorakit.engine.config import LoraConfig, is_svd_init
from lorakit.engine.model import adapter_parameters, inject, parameter_counts
from lorakit.engine.peft_format import CONFIG_NAME as ADAPTER_CONFIG_NAME
from lorakit.engine.peft_format import WEIGHTS_NAME, is_b_factor_key
from lorakit.io.atomic import remove_tree, write_text_atomic
from lorakit.io.console import make_console, make_progress
from lorakit.io.labels import LABELS_NAME, labels_json
from lorakit.training.chat import language_dataset, load_chat_template, read_conversations
from lorakit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.training.config import CONFIG_NAME, TrainConfig, TrainResult, settings_to_save
from lorakit.training.data import (
    IGNORE_INDEX,
    Example,
    classification_dataset,
    collate,
    epoch_order,
    label_values,
    read_records,
    read_rows,
)
from lorakit.training.distributed import fully_shard_api, start_processes
from lorakit.training.metrics import METRICS_NAME, append_metrics, keep_metrics_until, read_metrics
from lorakit.training.models import (
    CHAT_TEMPLATE_NAME,
    encoder_only_type,
    load_model_and_tokenizer,
    local_model_dir,
    max_positions,
)
from lorakit.training.ownership import owned_out
from lorakit.training.packing import check_packing, collate_packed, pack_examples

__all__ = ["RUN_FILES", "Trainer", "linear_schedule", "loss_count", "loss_sum", "train"]

PLOT_NAME = "loss.png"
# what a run writes into --out: a new run removes an earlier run's (with --overwrite where it had finished or saved
# checkpoints), so that nothing of it is left beside the new adapter
RUN_FILES = (
    ADAPTER_CONFIG_NAME,
    WEIGHTS_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    PLOT_NAME,
    LABELS_NAME,
    CHAT_TEMPLATE_NAME,
    "checkpoints",
)


# -- the loss ---------------------------------------------------------------------------------------


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a batch: every tensor but the labels is a model input (packed rows add positions)."""
    return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


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
    """How many terms `loss_sum` adds up for these examples: one each (seq-cls), or each predicted token."""
    return len(examples) if task == "seq-cls" else sum(e.targets() for e in examples)


# -- the loop ------------------------------------------------------------------------------------------


class Trainer:
    """State of one run. `lk.train(config)` builds one and calls `run()`."""

    def __init__(self, config: TrainConfig, console: Console | None = None):
        self.config = config
        self.console = console or make_console(stderr=True)
        if config.fsdp:
            fully_shard_api()  # an old torch is refused before anything loads
        self.procs = start_processes()
        self.out = Path(config.out)  # checked and locked by `train` (lorakit.training.ownership)
        # everything that can fail on bad input happens here, before any file is written
        # Rank 0 writes, so its --out decides, for every rank at once (each node may have an --out of its own).
        refusal = None if config.overwrite else self.earlier_run()
        if self.procs.all_sum([float(self.procs.main and refusal is not None)])[0]:
            raise ValueError(refusal or f"{self.out} holds an earlier run (the first process names it)")
        # the data files (and a chat template) are read and checked before the model loads
        if config.task == "seq-cls":
            records = read_records(config.data, config.text_field, config.label_field)
            eval_records = (
                read_records(config.eval_data, config.text_field, config.label_field) if config.eval_data else []
            )
            labels = label_values(records, config.data)
            if len(labels) < 2:
                raise ValueError(
                    f"{config.data}: seq-cls needs at least two different labels, and all are {labels[0]!r}"
                )
        else:
            conversations = read_conversations(config.data, config.format, config.text_field)
            eval_conversations = (
                read_conversations(config.eval_data, config.format, config.text_field) if config.eval_data else []
            )
            template = load_chat_template(config.chat_template) if config.chat_template else None
            labels = None
            self.check_decoder()
        torch.manual_seed(config.seed)
        heads = ["classifier", "score"] if config.task == "seq-cls" else []  # trained in full: never quantized
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model,
            config.task,
            len(labels) if labels else None,
            config.dtype,
            config.bits,
            keep=[*(config.modules_to_save or []), *heads],
        )
        # A lower-precision base runs under autocast, with the adapter in float32 (as PEFT): the optimizer's small
        # updates of bfloat16 factors would round away (8 bits of mantissa) and stall the training.
        self.base_dtype = self.model.dtype
        # float16 gradients underflow: the loss is scaled up before backward, and the step skipped on inf (PEFT and
        # transformers' Trainer alike)
        self.scaler = torch.amp.GradScaler(self.procs.device.type, enabled=self.base_dtype == torch.float16)
        if config.gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.model).__name__} does not support --gradient-checkpointing")
            # non-reentrant: gradients reach the adapter inside each block although the block's input needs none
            options = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        limit = max_positions(self.model, self.tokenizer)
        max_length = config.max_length if limit is None else min(config.max_length, limit)
        if config.task == "seq-cls":
            self.train_set = classification_dataset(records, self.tokenizer, max_length)
            self.eval_set = (
                classification_dataset(eval_records, self.tokenizer, max_length, labels) if eval_records else None
            )
        else:
            if template is not None:
                self.tokenizer.chat_template = template
            dataset = partial(language_dataset, tokenizer=self.tokenizer, max_length=max_length, loss_on=config.loss_on)
            self.train_set = dataset(conversations, where=config.data)
            self.eval_set = dataset(eval_conversations, where=config.eval_data) if eval_conversations else None
            if config.packing:  # rows of several examples each; deterministic, so a resumed run packs the same
                self.train_set.examples = pack_examples(self.train_set.examples, max_length)
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
            init=config.init,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            modules_to_save=config.modules_to_save,
            task_type="SEQ_CLS" if config.task == "seq-cls" else "CAUSAL_LM",
        )
        inject(self.model, lora)
        with torch.no_grad():
            for p in adapter_parameters(self.model).values():
                p.data = p.data.float()  # the adapter in float32, whatever the base (see base_dtype)
        if config.packing:  # attention that a 4-D mask cannot confine is refused before any step
            check_packing(self.model, max_length)
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

    def earlier_run(self) -> str | None:
        """Why this run may not start in --out, or None: a new run there would replace a finished run's adapter,
        or leave checkpoints that a later --resume would take up as its own; a --resume needs checkpoints (or
        nothing of a run yet) to continue from."""
        checkpoint = latest_checkpoint(self.out)
        finished = (self.out / WEIGHTS_NAME).is_file()  # the adapter a run writes when it ends
        if self.config.resume:
            if checkpoint is None and finished:
                return (
                    f"--resume: {self.out} holds a finished run without checkpoints (trained without --save-every): "
                    "there is nothing to continue from; use --overwrite instead to train it again from the start"
                )
            return None
        if checkpoint is not None:
            which, more = (", which finished", " with more --steps") if finished else ("", "")
            return (
                f"{self.out} holds checkpoints of an earlier run ({checkpoint.name}){which}: add --resume to continue "
                f"it{more}, or --overwrite to start over (which removes the earlier run's files), or choose another "
                "--out"
            )
        if finished:
            return (
                f"{self.out} holds the adapter of an earlier run: add --overwrite to replace it (which removes the "
                "earlier run's files), or choose another --out"
            )
        return None

    def check_decoder(self) -> None:
        """Refuses causal-lm on an encoder-only model (BERT, MiniLM, ...), which reads the whole text at once and
        so cannot learn to continue it, saying which flag to add where the data holds labels."""
        model_type = encoder_only_type(self.config.model)
        if model_type is None:
            return
        c = self.config
        labelled = any(c.label_field in row for _, row in read_rows(c.data, c.text_field))
        what = (
            f"{c.model} is an encoder-only model ({model_type}), which --task causal-lm cannot train to continue text"
        )
        if labelled:
            raise ValueError(
                f"{what}, and {c.data} has labels (field {c.label_field!r}): add --task seq-cls to learn them"
            )
        raise ValueError(f"{what}: use a decoder model (GPT, Llama, ...), or --task seq-cls with labelled data")

    def autocast(self) -> AbstractContextManager:
        """Mixed precision on a bfloat16 or float16 base: each op in the base's dtype where autocast deems it safe,
        the float32 adapter cast on the way in (its parameters, gradients and optimizer state stay float32)."""
        if self.base_dtype not in (torch.bfloat16, torch.float16):
            return nullcontext()
        return torch.autocast(self.procs.device.type, dtype=self.base_dtype)

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; with lr_ratio ≠ 1, LoRA+ (Hayou et al. 2024): the B factors learn lr_ratio times faster.

        Fused: one kernel updates every tensor, where the default steps through them one at a time in Python
        (as transformers' Trainer also defaults to on torch ≥ 2.8)."""
        params = adapter_parameters(self.model)
        b_keys = {k for k in params if is_b_factor_key(k)}
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
        if self.scaler.is_enabled() and isinstance(state.get("scaler"), dict):
            self.scaler.load_state_dict(state["scaler"])  # the loss scale float16 training had reached
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
            "format": c.format,
            "loss_on": c.loss_on,
            "chat_template": c.chat_template and str(Path(c.chat_template).expanduser().resolve()),
            "packing": c.packing,
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
            "bits": c.bits,  # the base quantized or not: other outputs, other gradients
        }

    def _distribute(self) -> nn.Module:
        """The module the loop calls: the model itself, DDP around it, or FSDP2 shards of its frozen base."""
        if self.procs.world == 1:
            return self.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # one order on every process
        if self.config.fsdp:
            fully_shard = fully_shard_api()
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

    def micro_batches(self, step: int) -> list[tuple[dict, int, int]]:
        """This process's slice of each global micro-batch of optimizer step `step`, with the global count of loss
        terms and this slice's count of tokens."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_set), self.config.seed, epoch)
        examples, size = self.train_set.examples, self.config.batch_size
        batches = []
        for k in range(self.config.grad_accum):
            start = (in_epoch * self.config.grad_accum + k) * self.global_micro
            whole = [examples[i] for i in order[start : start + self.global_micro].tolist()]
            mine = whole[self.procs.rank * size : (self.procs.rank + 1) * size]
            batch = self.collate(mine)
            on_device = {key: value.to(self.procs.device) for key, value in batch.items()}
            tokens = sum(len(e.input_ids) for e in mine)
            batches.append((on_device, loss_count(whole, self.config.task), tokens))
        return batches

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """A batch of examples as tensors: padded, or packed rows with their positions and attention."""
        if self.config.packing:
            dtype = self.model.get_input_embeddings().weight.dtype  # the mask's: sdpa wants the queries' own
            return collate_packed(examples, self.tokenizer.pad_token_id, dtype)
        return collate(examples, self.tokenizer.pad_token_id, self.config.task)

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns its loss (global mean) and the tokens it processed."""
        self.trained.train()
        batches = self.micro_batches(step)
        total = sum(count for _, count, _ in batches)
        ddp = isinstance(self.trained, nn.parallel.DistributedDataParallel)
        summed, tokens = 0.0, 0
        for k, (batch, _, batch_tokens) in enumerate(batches):
            last = k == len(batches) - 1
            sync = self.trained.no_sync() if ddp and not last else nullcontext()
            with sync:
                with self.autocast():
                    loss = loss_sum(logits_of(self.trained, batch), batch, self.config.task)
                # DDP averages gradients over processes, so scale by world to get sum / global count
                self.scaler.scale(loss * (self.procs.world if ddp else 1) / max(total, 1)).backward()
            summed += loss.item()
            tokens += batch_tokens
        if self.config.fsdp and self.procs.world > 1:
            for p in self.model.parameters():
                if p.requires_grad and p.grad is not None:
                    dist.all_reduce(p.grad)
        self.scaler.step(self.optimizer)  # the optimizer's step, on unscaled gradients (skipped on inf in float16)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed, tokens = self.procs.all_sum([summed, float(tokens)])
        return summed / max(total, 1), int(tokens)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the tokens the training loss sees, and perplexity (causal-lm) or accuracy (seq-cls), on the eval
        data, each process on its share."""
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
            with self.autocast():
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
        else:  # exp of the mean loss per predicted token; math.exp overflows past e^709
            result["eval_perplexity"] = math.exp(result["eval_loss"]) if result["eval_loss"] < 709 else math.inf
        return result

    def report_data(self) -> None:
        """What tokenizing the data did, in the log and on the console: cut and dropped examples are never silent."""
        sets = [("train_", self.train_set)] + ([("eval_", self.eval_set)] if self.eval_set is not None else [])
        self.log({"step": 0, **{k: v for prefix, data in sets for k, v in data.stats.as_record(prefix).items()}})
        for name, data in sets:
            stats = data.stats
            if stats.truncated or stats.dropped:
                lines = ", ".join(map(str, stats.dropped_lines[:5])) + (" …" if stats.dropped > 5 else "")
                dropped = f"; {stats.dropped} dropped, no trained token left (lines {lines})" if stats.dropped else ""
                cut = f"{stats.truncated} example(s) cut to --max-length {self.config.max_length}"
                self.say(f"{name.rstrip('_')} data: {cut}{dropped}")

    def remove_earlier_run(self) -> None:
        """Removes what an earlier run left in --out (its adapter, labels, log, plot, checkpoints, ...), which
        `earlier_run` allowed: this run's files are then the only ones there. Other files are left alone."""
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)  # gone at once: a kill mid-deletion leaves a hidden leftover, not half of it
            elif path.exists() or path.is_symlink():
                path.unlink()

    def log(self, record: dict[str, Any]) -> None:
        if self.procs.main:
            append_metrics(self.out / METRICS_NAME, record)

    def checkpoint(self, step: int) -> None:
        rank_states = cuda_states = None
        if self.procs.world > 1:
            rank_states = self.procs.all_gather(torch.get_rng_state())
            if torch.cuda.is_available():
                cuda_states = self.procs.all_gather(torch.cuda.get_rng_state())  # each process's own device
        if self.procs.main:
            extra = {
                "run": self.run_settings(),
                **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            }
            with warnings.catch_warnings():  # pissa_niter_K: a resume re-runs lorakit's own seeded SVD, as needed
                warnings.filterwarnings("ignore", "adapter .* starts from the randomized SVD")
                save_checkpoint(
                    self.out,
                    step,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    extra,
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
            if self.start_step == 0:
                self.remove_earlier_run()
            write_text_atomic(self.out / CONFIG_NAME, json.dumps(settings_to_save(config), indent=2) + "\n")
            keep_metrics_until(self.out / METRICS_NAME, self.start_step)
        if self.start_step == 0:
            self.report_data()
            if self.eval_set is not None:
                self.log({"step": 0, **self.evaluate()})
        evaluation, evaluated_at = None, None  # the latest eval in the loop, and its step
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
                checkpoint_now = config.save_every and (done % config.save_every == 0 or done == self.total_steps)
                if checkpoint_now or (config.eval_every and done % config.eval_every == 0):
                    evaluation, evaluated_at = self.evaluate(), done
                    if evaluation:
                        self.log({"step": done, **evaluation})
                if checkpoint_now:
                    self.checkpoint(done)
        if evaluated_at != self.total_steps:
            evaluation = self.evaluate()
            if evaluation and self.start_step < self.total_steps:  # resumed at the end: its eval is in the log
                self.log({"step": self.total_steps, **evaluation})
        if evaluation:
            self.say("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
        if self.procs.main:
            if self.train_set.labels is not None:  # before the adapter: a finished adapter always has its labels
                write_text_atomic(self.out / LABELS_NAME, labels_json(self.train_set.labels))
            if config.chat_template:  # generate and merge render prompts with it, as the training data was
                write_text_atomic(self.out / CHAT_TEMPLATE_NAME, self.tokenizer.chat_template)
            # an adapter started from the weight (PiSSA, ...) as the equivalent plain LoRA, for an untouched base
            save_adapter(
                self.model, self.out, base_model_name_or_path=config.model, convert_to_lora=is_svd_init(config.init)
            )
            from lorakit.io.plots import training_plot  # matplotlib only where a plot is drawn

            training_plot(read_metrics(self.out / METRICS_NAME), self.out / PLOT_NAME)
            self.say(f"adapter saved in {self.out}/ (loss plot: {self.out / PLOT_NAME})")
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


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Fine-tunes `config.model` with LoRA on `config.data` and writes a PEFT-format adapter to `config.out`.

    Beside the adapter, `config.out` gets metrics.jsonl, loss.png, train_config.json (written as the run starts;
    `saved_config` reads it back), labels.json for seq-cls and, with `save_every`, checkpoints/. A new run first
    removes what an earlier one left there (RUN_FILES), which `overwrite` allows where that run had finished or
    saved checkpoints. Under torchrun only rank 0 writes.

    Args:
        config: the run's settings (see TrainConfig, or `lorakit finetune --help`).
        console: where progress and messages go (None: a console on stderr); only rank 0 prints.

    Returns:
        The run's directory, step count, last training loss, final eval metrics and wall-clock seconds.

    Raises:
        ValueError: `config.out` is empty, a file, the model, data or another input (or inside or around one),
            is in use by another run (refused at once, naming it), or holds an earlier run's checkpoints or
            finished adapter and neither `resume` nor `overwrite` is on (with `resume`: a finished run without
            checkpoints); data that cannot be read (empty, not UTF-8, bad JSON or CSV, a missing or empty
            field); seq-cls data without labels, with fewer than two, of mixed kinds, or eval labels the training
            data lacks; causal-lm on an encoder-only model; too few examples for one optimizer step; a model
            directory or hub name transformers cannot load, or one without gradient checkpointing where it is
            asked for; `targets` that match no module; a checkpoint to resume from that does not fit this run or
            is past its steps; `fsdp` on torch < 2.6.
        FileNotFoundError: no data or eval data file, or no local model directory at `config.model`.
        OSError: `config.out` cannot be written (found before anything loads), or a write fails (naming its file).

    Warns:
        UserWarning: a name of a `targets` list that matches no module (lk.inject's warning).
    """
    with owned_out(config):  # --out checked against the inputs, locked for the run, cleared of its own leftovers
        return Trainer(config, console).run()
