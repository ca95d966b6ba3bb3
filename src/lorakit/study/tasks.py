"""The fine-tunings a study measures: a starting model θ₀, a training loss, a held-out metric and a recipe.

- `digits_task`: the demo's digit classifier (lorakit.demo: the oversized MLP, 64 → 1000 → 2000 → 10, pre-trained
  on scikit-learn's 8×8 digits as the demo trains it) fine-tuned to read the same digits transposed (each image
  mirrored along its diagonal), a new input distribution on which it starts far below its own accuracy.
- `text_task`: a transformers sequence classifier (all-MiniLM-L6-v2, say) on the user's labelled JSONL or CSV
  files, its classification head new (seeded) as in `lorakit finetune --task seq-cls`.

The metric is accuracy on the held-out data in both.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from lorakit.demo.experiment import BATCH as DEMO_BATCH
from lorakit.demo.experiment import Digits, load_digits_split, oversized_mlp
from lorakit.demo.experiment import evaluate as digits_accuracy
from lorakit.demo.experiment import train as demo_train
from lorakit.demo.settings import DemoSettings
from lorakit.study.intrinsic import Evaluate
from lorakit.study.recipe import Loss, Recipe, final_loss, fit
from lorakit.training.data import classification_dataset, collate, label_values, read_records
from lorakit.training.loop import logits_of, loss_sum
from lorakit.training.models import load_model_and_tokenizer, max_positions

__all__ = [
    "DIGITS_BATCH",
    "DIGITS_RECIPE",
    "TEXT_RECIPE",
    "Task",
    "digits_objective",
    "digits_task",
    "text_task",
    "train_full",
]

DIGITS_BATCH = 64
TEXT_BATCH = 16
EVAL_BATCH = 64
MAX_LENGTH = 128  # tokens per text

DIGITS_RECIPE = Recipe(steps=300, full_lr=1e-3, lora_lr=1e-3, subspace_lr=0.1)
TEXT_RECIPE = Recipe(steps=100, full_lr=1e-4, lora_lr=1e-3, subspace_lr=0.02)


@dataclass
class Task:
    """A fine-tuning as a study sees it.

    Attributes:
        name: what is fine-tuned on what, in a few words.
        model: θ₀, the starting model, in eval mode; every run starts from it (subspaces wrap it, LoRA and full
            fine-tuning train copies).
        loss: the mean loss of a training batch under a model, the batch drawn with the generator it is given.
        evaluate: the model's accuracy on the held-out data.
        recipe: how every run trains.
        head: modules that every kind of run trains (a new classification head; LoRA trains it in full).
        lora_task_type: the LoraConfig task_type ("SEQ_CLS" for a classifier, whose head LoRA then trains in full).
        train_examples: how many training examples.
        eval_examples: how many held-out examples.
    """

    name: str
    model: nn.Module
    loss: Loss
    evaluate: Evaluate
    recipe: Recipe
    head: Sequence[str] = ()
    lora_task_type: str | None = None
    train_examples: int = 0
    eval_examples: int = 0


def transposed(x: torch.Tensor) -> torch.Tensor:
    """8×8 images (n, 64), each mirrored along its diagonal: pixel (i, j) moves to (j, i)."""
    return x.view(-1, 8, 8).transpose(1, 2).reshape(-1, 64)


def digits_objective(data: Digits) -> tuple[Loss, Evaluate]:
    """The training loss (cross-entropy of a random batch of DIGITS_BATCH training digits) and the metric (test
    accuracy) of a digits task on `data`."""

    def loss(model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        batch = torch.randint(0, len(data.x_train), (DIGITS_BATCH,), generator=generator)
        return F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])

    def evaluate(model: nn.Module) -> float:
        model.eval()
        return digits_accuracy(model, data)[1]

    return loss, evaluate


def digits_task(seed: int, console: Console, steps: int | None = None) -> Task:
    """The demo's digit classifier, pre-trained as the demo trains it, to be fine-tuned on transposed digits.

    Args:
        seed: seeds the split, the classifier's initialisation and its pre-training batches.
        console: where the pre-training's progress goes.
        steps: the recipe's steps (None: DIGITS_RECIPE's).

    Returns:
        The task; its model scores the demo's accuracy on upright digits and much less on transposed ones.
    """
    data = load_digits_split(seed)
    with torch.random.fork_rng():  # the caller's random stream stays as it was
        torch.manual_seed(seed)
        model = oversized_mlp()
        pre_training = DemoSettings.base_epochs * len(data.x_train) // DEMO_BATCH
        generator = torch.Generator().manual_seed(seed)
        demo_train(model, data.x_train, data.y_train, pre_training, generator, console, "pre-training the digits MLP")
    upright = digits_accuracy(model, data)[1]
    task_data = Digits(transposed(data.x_train), data.y_train, transposed(data.x_test), data.y_test)
    console.print(f"the digits MLP reads {upright:.2%} of upright test digits; the task: transposed ones")

    loss, evaluate = digits_objective(task_data)
    recipe = DIGITS_RECIPE if steps is None else replace(DIGITS_RECIPE, steps=steps)
    return Task(
        "the demo's digit classifier on transposed digits",
        model.eval(),
        loss,
        evaluate,
        recipe,
        train_examples=len(task_data.x_train),
        eval_examples=len(task_data.x_test),
    )


def text_task(
    model: str | os.PathLike,
    data: str | os.PathLike,
    eval_data: str | os.PathLike,
    text_field: str = "text",
    label_field: str = "label",
    seed: int = 0,
    steps: int | None = None,
) -> Task:
    """A transformers sequence classifier on labelled text files.

    Args:
        model: a transformers model directory (or hub name, where there is network).
        data: the training data, JSONL or CSV, one text and its label per row.
        eval_data: the held-out data, whose labels are among the training data's.
        text_field: the rows' text field.
        label_field: the rows' label field.
        seed: seeds the new classification head.
        steps: the recipe's steps (None: TEXT_RECIPE's).

    Returns:
        The task.

    Raises:
        ValueError: unreadable data, fewer than two labels, held-out labels the training data lacks, a model that
            transformers cannot load as a sequence classifier.
        FileNotFoundError: a data file or model directory that does not exist.
    """
    records = read_records(data, text_field, label_field)
    eval_records = read_records(eval_data, text_field, label_field)
    labels = label_values(records, data)
    if len(labels) < 2:
        raise ValueError(f"{data}: a classifier needs at least two different labels, and all are {labels[0]!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new head
        network, tokenizer = load_model_and_tokenizer(str(model), "seq-cls", len(labels))
    limit = max_positions(network, tokenizer)
    max_length = MAX_LENGTH if limit is None else min(MAX_LENGTH, limit)
    train_set = classification_dataset(records, tokenizer, max_length)
    eval_set = classification_dataset(eval_records, tokenizer, max_length, labels)
    pad = tokenizer.pad_token_id
    eval_batches = [
        collate(eval_set.examples[start : start + EVAL_BATCH], pad, "seq-cls")
        for start in range(0, len(eval_set), EVAL_BATCH)
    ]

    def loss(model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        picked = torch.randint(0, len(train_set), (TEXT_BATCH,), generator=generator).tolist()
        batch = collate([train_set.examples[i] for i in picked], pad, "seq-cls")
        return loss_sum(logits_of(model, batch), batch, "seq-cls") / len(picked)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        correct = sum(int((logits_of(model, b).argmax(-1) == b["labels"]).sum()) for b in eval_batches)
        return correct / len(eval_set)

    recipe = TEXT_RECIPE if steps is None else replace(TEXT_RECIPE, steps=steps)
    return Task(
        f"{model} on {len(labels)} labels of {data}",
        network.eval(),
        loss,
        evaluate,
        recipe,
        head=("classifier", "score"),
        lora_task_type="SEQ_CLS",
        train_examples=len(train_set),
        eval_examples=len(eval_set),
    )


def train_full(task: Task, names: Sequence[str], console: Console, seed: int = 0) -> tuple[dict, nn.Module]:
    """Trains every parameter in `names` of a copy of the task's model with its recipe (full fine-tuning).

    Args:
        task: the fine-tuning.
        names: the parameters that train (the rest stay frozen).
        console: where progress goes.
        seed: seeds the batches.

    Returns:
        ({"metric", "loss", "trainable", "seconds"}, the trained copy).
    """
    started = time.perf_counter()
    model = copy.deepcopy(task.model).requires_grad_(False)
    trained = [model.get_parameter(name).requires_grad_(True) for name in names]
    losses = fit(model, trained, task.loss, task.recipe.steps, task.recipe.full_lr, seed, console, "full training")
    point = {
        "metric": task.evaluate(model),
        "loss": final_loss(losses),
        "trainable": sum(p.numel() for p in trained),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return point, model
