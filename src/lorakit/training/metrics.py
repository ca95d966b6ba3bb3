"""A run's log, `metrics.jsonl`: one JSON object a line, appended as the run goes (a line torn by a kill is
dropped when read), cut back to the resumed checkpoint's step when a run resumes (damaged lines dropped then)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from lorakit.io.atomic import write_text_atomic, writing
from lorakit.io.untrusted import loads_json
from lorakit.training.data import read_jsonl, read_lines

__all__ = ["METRICS_NAME", "append_metrics", "json_line", "keep_metrics_until", "read_metrics"]

METRICS_NAME = "metrics.jsonl"


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
    step 0), dropping the interrupted or earlier run's tail. The log is the run's own, and never blocks it: a line
    that is not a JSON object with an integer step (torn by a kill, damaged) is dropped, with a warning unless it
    is the torn last line a kill leaves."""
    if not path.is_file():
        return
    lines = [line for line in read_lines(path) if line.strip()] if step else []
    records = [_record(line) for line in lines]
    damaged = sum(record is None for record in records[:-1])
    if damaged:
        warnings.warn(f"{path}: {damaged} damaged line(s) dropped from the log", stacklevel=2)
    kept = [
        line
        for line, record in zip(lines, records, strict=True)
        if record is not None and record.get("step", 0) <= step
    ]
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))  # as they were: read back as they were read


def _record(line: str) -> dict[str, Any] | None:
    """The record on one line of the log, or None where it is no JSON object with an integer step."""
    try:
        record = loads_json(line)
    except ValueError:  # invalid JSON included
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Appends one record to the log at `path` (not rewritten atomically: a line torn by a kill is dropped by
    `read_metrics`); an OSError (a full disk) names `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path), path.open("a", encoding="utf-8") as f:
        f.write(json_line(record))
