"""Classifying texts with a seq-cls adapter: each text's label and the probability of every label, in batches.

    classifier = load_classifier("./minilm", "cls/")
    predictions = predict(classifier, ["a great film", "a bore"], batch_size=32)
    predictions[0].label, predictions[0].score, predictions[0].scores   # "positive", 0.97, {"negative": 0.03, ...}

The labels are those `lorakit finetune --task seq-cls` kept beside the adapter (labels.json: class i is labels[i]),
or LABEL_0, LABEL_1, ... where there is no such file. Texts are cut to the model's own limit, as in training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.engine.adapter_files import load_adapter
from lorakit.engine.peft_format import CONFIG_NAME, config_from_peft, read_adapter_config
from lorakit.inference.export import classifier_labels, tensor_shapes
from lorakit.io.labels import label_config
from lorakit.training.models import load_model_and_tokenizer, max_positions

__all__ = ["Classifier", "Prediction", "load_classifier", "predict"]


@dataclass
class Classifier:
    """A base model with a seq-cls adapter loaded, in eval mode, its tokenizer and its labels (class i is labels[i])."""

    model: nn.Module
    tokenizer: Any
    labels: list
    max_length: int | None  # the most tokens of a text the model reads (None: no limit known)


@dataclass
class Prediction:
    """One text's class: its label (as labels.json holds it), that label's probability, and every label's
    probability by its name (the label as text)."""

    label: Any
    score: float
    scores: dict[str, float]


def load_classifier(
    model: str | os.PathLike, adapter: str | os.PathLike, device: torch.device | str | None = None
) -> Classifier:
    """The base model with a seq-cls adapter, ready to classify: its config's id2label names the labels.

    Args:
        model: the base model's local transformers directory (or a hub name, where there is network).
        adapter: a PEFT-format seq-cls adapter directory trained on that model, as `lorakit finetune --task
            seq-cls` writes it (labels.json beside it names the classes).
        device: where the model runs (None: the first GPU where there is one, else the CPU).

    Returns:
        The Classifier.

    Raises:
        FileNotFoundError: no adapter directory, or a file of it missing; no model directory.
        ValueError: an adapter of another task (a causal-lm adapter is for `lorakit generate`); a bad labels.json,
            or none and no classification head to count the classes of; a model transformers cannot load, or
            that the adapter does not fit.
    """
    adapter_dir = Path(adapter).expanduser()
    lora = config_from_peft(read_adapter_config(adapter_dir), str(adapter_dir / CONFIG_NAME))
    if lora.task_type != "SEQ_CLS":
        raise ValueError(
            f"the adapter in {adapter_dir} is not a classifier (task_type {lora.task_type!r}, not 'SEQ_CLS'): "
            "predict labels texts with adapters of --task seq-cls; lorakit generate answers with the others"
        )
    labels = classifier_labels(adapter_dir, tensor_shapes(adapter_dir))
    base, tokenizer = load_model_and_tokenizer(str(model), "seq-cls", len(labels))
    for key, value in label_config(labels).items():
        setattr(base.config, key, value)
    try:
        load_adapter(base, adapter_dir)
    except ValueError as error:
        raise ValueError(f"the adapter in {adapter_dir} does not fit the model in {model}: {error}") from None
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    base.to(device).eval()
    return Classifier(base, tokenizer, labels, max_positions(base, tokenizer))


@torch.no_grad()
def predict(classifier: Classifier, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
    """Each text's label and the probabilities of all labels, `batch_size` texts a forward pass.

    Args:
        classifier: from `load_classifier`.
        texts: the texts, each cut to the model's limit.
        batch_size: texts per forward pass, a positive integer.

    Returns:
        One Prediction per text, in order.

    Raises:
        ValueError: a batch size that is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the batch size must be a positive integer, got {batch_size!r}")
    model, tokenizer, labels = classifier.model, classifier.tokenizer, classifier.labels
    device = next(model.parameters()).device
    names = [str(label) for label in labels]
    found = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=classifier.max_length is not None,
            max_length=classifier.max_length,
            return_tensors="pt",
        ).to(device)
        probabilities = model(**batch).logits.float().softmax(-1)  # (batch, classes)
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            found.append(Prediction(labels[best], row[best], dict(zip(names, row, strict=True))))
    return found
