"""Training data from local files: reading records, tokenizing them, and batching them.

Files: JSONL (one JSON object a line), CSV (with a header row) or plain text (one example a line, the text
field only). Tasks: "causal-lm" learns to continue each text (labels = the input tokens), "seq-cls" learns
a label per text. Every problem with a file is reported with the file and, where there is one, the line.

Batching is deterministic and independent of the number of processes: every epoch is one permutation of
the dataset drawn from (seed, epoch), cut into global micro-batches, and each process takes its own
contiguous slice of every global micro-batch.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "TextDataset",
    "collate",
    "epoch_order",
    "label_values",
    "read_jsonl",
    "read_lines",
    "read_records",
]

IGNORE_INDEX = -100  # label of positions that carry no loss (padding)
Task = Literal["causal-lm", "seq-cls"]


def read_records(path: str | os.PathLike, text_field: str = "text", label_field: str | None = None) -> list[dict]:
    """[{"text": ..., "label": ...}] from a .jsonl / .json, .csv or any other (plain text) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        if label_field is not None:
            raise ValueError(f"{path}: a plain text file has no label field; use JSONL or CSV for labelled data")
        rows = [(n, {text_field: line}) for n, line in enumerate(read_lines(path), start=1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    records = []
    for line, row in rows:
        record = {"text": _field(row, text_field, path, line, str)}
        if not record["text"].strip():
            raise ValueError(f"{path}: line {line}: field {text_field!r} is empty")
        if label_field is not None:
            record["label"] = _field(row, label_field, path, line, (str, int, bool))
        records.append(record)
    return records


# "utf-8-sig": a byte-order mark (Excel's CSV export, Windows editors) is not part of the first field
ENCODING = "utf-8-sig"


def read_lines(path: Path) -> list[str]:
    """The file's lines. Only line breaks end a line (\\n, \\r\\n, \\r), not the other characters str.splitlines()
    splits at (U+2028, form feed, ...), which JSON strings and texts may hold."""
    try:
        return path.read_text(encoding=ENCODING).split("\n")  # text mode: \r\n and \r arrive as \n
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_jsonl(path: Path, drop_torn_last: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file; a line that is not a JSON object is a
    ValueError naming the file and the line. With `drop_torn_last`, a last line that is not valid JSON is
    dropped instead: the one a process killed mid-write leaves torn."""
    lines = [(number, line) for number, line in enumerate(read_lines(path), start=1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if drop_torn_last and k == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        with path.open(newline="", encoding=ENCODING) as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    except (csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from None


def _field(row: dict, name: str, path: Path, line: int, types: Any) -> Any:
    if name not in row or row[name] is None:
        raise ValueError(f"{path}: line {line} has no field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[name]
    if not isinstance(value, types):
        what = "text" if types is str else "text, an integer or true/false (a class)"
        raise ValueError(f"{path}: line {line}: field {name!r} must be {what}, got {value!r}")
    return value


def label_values(records: list[dict]) -> list:
    """The distinct labels of seq-cls records, in a fixed order: class i is `label_values(records)[i]`."""
    return sorted({r["label"] for r in records}, key=str)


@dataclass
class Example:
    input_ids: list[int]
    label: int | None = None  # seq-cls only


class TextDataset:
    """Tokenized examples of one task, each truncated to `max_length` tokens (at least 2: TrainConfig checks it).
    For seq-cls, `labels` maps each label value to its class id."""

    def __init__(self, records: list[dict], tokenizer: Any, task: Task, max_length: int, labels: list | None = None):
        self.task = task
        if task == "seq-cls":
            self.labels = labels if labels is not None else label_values(records)
            index = {value: i for i, value in enumerate(self.labels)}
            unknown = [r["label"] for r in records if r["label"] not in index]
            if unknown:
                raise ValueError(f"label {unknown[0]!r} is not one of the training labels {self.labels}")
        else:
            self.labels = None
        encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)["input_ids"]
        for ids, r in zip(encoded, records, strict=True):
            if not ids:
                raise ValueError(f"the text {r['text']!r} has no tokens for this tokenizer")
        self.examples = [
            Example(ids, index[r["label"]] if task == "seq-cls" else None)
            for ids, r in zip(encoded, records, strict=True)
        ]
        if task == "causal-lm" and not any(len(e.input_ids) >= 2 for e in self.examples):
            raise ValueError("every example is shorter than two tokens: nothing to learn to predict")

    def __len__(self) -> int:
        return len(self.examples)


def collate(examples: list[Example], pad_id: int, task: Task) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids and attention_mask (batch, L), and labels ((batch, L) or (batch,))."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, : len(e.input_ids)] = 1
    if task == "seq-cls":
        labels = torch.tensor([e.label for e in examples])
    else:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
