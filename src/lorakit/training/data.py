"""Training data from local files: reading records, tokenizing them, and batching them.

Files: JSONL (one JSON object a line), CSV (with a header row) or plain text (one example a line, the text
field only). Tasks: "causal-lm" learns to continue each text, or the answers of instruction and chat data
(lorakit.training.chat: which tokens carry the loss), "seq-cls" learns a label per text. Every problem with a
file is reported with the file and, where there is one, the line.

Batching is deterministic and independent of the number of processes: every epoch is one permutation of
the dataset drawn from (seed, epoch), cut into global micro-batches, and each process takes its own
contiguous slice of every global micro-batch.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorakit.io.untrusted import loads_json

if TYPE_CHECKING:  # torch is imported by the two functions that make tensors: the flags of `lorakit finetune`
    import torch  # come from TrainConfig, which reads this module, and `lorakit --help` needs no torch

__all__ = [
    "IGNORE_INDEX",
    "DataStats",
    "Example",
    "TextDataset",
    "classification_dataset",
    "collate",
    "epoch_order",
    "label_key",
    "label_values",
    "read_csv",
    "read_jsonl",
    "read_lines",
    "read_records",
    "read_rows",
]

IGNORE_INDEX = -100  # label of positions that carry no loss (padding)
Task = Literal["causal-lm", "seq-cls"]


def read_records(
    path: str | os.PathLike, text_field: str = "text", label_field: str | None = None, labels_required: bool = True
) -> list[dict]:
    """[{"text": ..., "label": ...}] from a .jsonl / .json, .csv or any other (plain text) file.

    With a `label_field`, every row holds a label; with `labels_required=False` too, a file in which no row has
    that field gives texts alone (a plain text file among them), where a task that learns labels refuses it and
    says which flag to add.
    """
    refusal = "a plain text file has no label field; use JSONL or CSV for labelled data"
    refusal = refusal if label_field is not None and labels_required else None
    path, rows = Path(path), read_rows(path, text_field, refusal)
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    if label_field is not None and not any(label_field in row for _, row in rows):
        if not labels_required:
            label_field = None
        else:
            raise ValueError(
                f"{path}: no row has the label field {label_field!r} (line {rows[0][0]} has: "
                f"{', '.join(map(str, rows[0][1])) or 'no field'}): --task seq-cls learns a label per text; name "
                "the field that holds them with --label-field, or learn the texts themselves with --task causal-lm"
            )
    records = []
    for line, row in rows:
        record = {"text": _field(row, text_field, path, line, str)}
        if not record["text"].strip():
            raise ValueError(f"{path}: line {line}: field {text_field!r} is empty")
        if label_field is not None:
            record["label"] = _field(row, label_field, path, line, (str, int, bool))
        records.append(record)
    return records


def read_rows(
    path: str | os.PathLike, text_field: str, plain_text_refusal: str | None = None
) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a .jsonl/.json, .csv or plain text file (a line: {text_field: line}).
    `plain_text_refusal`, where given, is the error a plain text file gets (it holds texts alone)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    if plain_text_refusal is not None:
        raise ValueError(f"{path}: {plain_text_refusal}")
    return [(n, {text_field: line}) for n, line in enumerate(read_lines(path), start=1) if line.strip()]


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
    """(line number, object) for each non-empty line of a JSONL file; a line that is not a JSON object, or one
    nested too deeply or with too long a number to be read safely (lorakit.io.untrusted.loads_json), is a
    ValueError naming the file and the line. With `drop_torn_last`, a last line that is not valid JSON is
    dropped instead: the one a process killed mid-write leaves torn."""
    lines = [(number, line) for number, line in enumerate(read_lines(path), start=1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            row = loads_json(line)
        except json.JSONDecodeError as error:
            if drop_torn_last and k == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        except ValueError as error:  # valid, and too deep or too long
            raise ValueError(f"{path}: line {number}: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def read_csv(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a CSV file with a header; an unreadable file is one ValueError."""
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


WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
LABEL_KINDS = {bool: "true/false", int: "an integer", str: "text"}  # what a label can be (bool before int)


def label_key(label: Any) -> tuple[str, Any]:
    """A label with its kind: JSON's true, 1 and "1" are three labels, where Python's == and hashing make the
    first two one."""
    return LABEL_KINDS[type(label)], label


def label_values(records: list[dict], where: str | os.PathLike = "the data") -> list:
    """The distinct labels of seq-cls records in class order: class i is `label_values(records)[i]`.

    Integers sort numerically, and so does text that is all whole numbers ("2" before "10", as a CSV file holds
    them), so that class i is label i wherever the labels are 0 … n-1; other text sorts alphabetically, false
    before true.

    Raises:
        ValueError: labels of different kinds (true/false, integers, text), naming one of each: read as one label
            by some readers and as two by others, they would be merged or split without a word.
    """
    first_of_kind = {}
    for record in records:
        first_of_kind.setdefault(label_key(record["label"])[0], record["label"])
    if len(first_of_kind) > 1:
        shown = ", ".join(f"{json.dumps(value)} ({kind})" for kind, value in first_of_kind.items())
        raise ValueError(
            f"{where}: the labels mix kinds, {shown}: write every label the same way (all text, all integers or "
            "all true/false)"
        )
    labels = {record["label"] for record in records}
    if all(isinstance(label, str) and WHOLE_NUMBER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))  # "01" and "1" are two labels: both kept
    return sorted(labels)


@dataclass
class Example:
    """One tokenized example (or, packed, one row of several: lorakit.training.packing)."""

    input_ids: list[int]
    label: int | None = None  # seq-cls: the class id
    labels: list[int] | None = None  # causal-lm: the token at each position, IGNORE_INDEX where it carries no loss
    position_ids: list[int] | None = None  # packed rows: positions restart at 0 for each example

    def targets(self) -> int:
        """How many tokens the causal-lm loss predicts here: every position but the first that carries a label."""
        if self.labels is None:
            return max(len(self.input_ids) - 1, 0)
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class DataStats:
    """What tokenizing a file did: the examples it made, how many were cut at max_length, and how many were
    dropped for having no trained token left (with the first few of their line numbers)."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def as_record(self, prefix: str = "") -> dict[str, int]:
        """The counts as fields of a metrics.jsonl record."""
        return {
            f"{prefix}examples": self.examples,
            f"{prefix}truncated": self.truncated,
            f"{prefix}dropped": self.dropped,
        }


@dataclass
class TextDataset:
    """Tokenized examples of one task; for seq-cls, `labels` lists the label values (class i is labels[i])."""

    examples: list[Example]
    labels: list | None = None
    stats: DataStats = field(default_factory=DataStats)

    def __len__(self) -> int:
        return len(self.examples)


def classification_dataset(
    records: list[dict], tokenizer: Any, max_length: int, labels: list | None = None
) -> TextDataset:
    """seq-cls examples: each text's tokens (cut to `max_length`) and its class id; `labels` fixes the classes
    (an eval set's must be the training set's), else they are the records' own, sorted."""
    labels = labels if labels is not None else label_values(records)
    index = {label_key(value): i for i, value in enumerate(labels)}
    unknown = [r["label"] for r in records if label_key(r["label"]) not in index]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not one of the training labels {labels}")
    encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)["input_ids"]
    for ids, r in zip(encoded, records, strict=True):
        if not ids:
            raise ValueError(f"the text {r['text']!r} has no tokens for this tokenizer")
    examples = [Example(ids, index[label_key(r["label"])]) for ids, r in zip(encoded, records, strict=True)]
    return TextDataset(examples, labels, DataStats(examples=len(examples)))


def collate(examples: list[Example], pad_id: int, task: Task) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids and attention_mask (batch, L), and labels ((batch, L) with IGNORE_INDEX
    where no loss is taken, or (batch,) for seq-cls)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.input_ids)] = torch.tensor(e.input_ids if e.labels is None else e.labels)
    if task == "seq-cls":
        labels = torch.tensor([e.label for e in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
