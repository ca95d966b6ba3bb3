"""labels.json: a classifier's labels beside its adapter, class i being labels[i], and the `id2label` /
`label2id` a transformers config names them with.

`lorakit finetune --task seq-cls` writes the file; `merge` puts the names into the merged model's config, so that
`pipeline("text-classification")` prints them; `predict` and the SVD tools read and carry it. It is plain JSON,
for any reader (PEFT's `PeftModel.from_pretrained` needs the base built with these labels, see the README):

    ["negative", "neutral", "positive"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.io.untrusted import read_json

__all__ = ["LABELS_NAME", "label_config", "labels_json", "read_labels"]

LABELS_NAME = "labels.json"


def read_labels(directory: Path) -> list | None:
    """The labels in `directory`/labels.json (class i is labels[i]), or None where there is no such file.

    Raises:
        ValueError: a file that is not valid JSON, or not a list of at least two different labels of one kind
            (text, integers or true/false).
    """
    path = Path(directory) / LABELS_NAME
    if not path.is_file():
        return None
    labels = read_json(path)  # bounded in size and depth (lorakit.io.untrusted)
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(label, str | int) for label in labels)  # bool is an int
        or len({type(label) for label in labels}) != 1  # all text, all integers or all true/false
        or len({json.dumps(label) for label in labels}) != len(labels)
        or len({str(label) for label in labels}) != len(labels)  # a config names each by its text
    ):
        raise ValueError(
            f"{path} must hold a JSON list of at least two different labels, all text, all integers or all true/false"
        )
    return labels


def labels_json(labels: list) -> str:
    """The text of a labels.json file for `labels`."""
    return json.dumps(labels) + "\n"


def label_config(labels: list) -> dict[str, Any]:
    """{"id2label": {i: name}, "label2id": {name: i}} for a transformers config, each label named by its text
    (JSON's true as "True", as Python writes it)."""
    names = [str(label) for label in labels]
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
