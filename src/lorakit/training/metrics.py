"""A run's log, `metrics.jsonl`: one JSON object a line, appended as the run goes (a line torn by a kill is
dropped when read), cut back to the resumed checkpoint's step when a run resumes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lorakit.io.atomic import write_text_atomic
from lorakit.training.data import read_jsonl

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
    step 0), dropping the interrupted or earlier run's tail and any torn last line."""
    if path.is_file():
        kept = [record for record in read_metrics(path) if record.get("step", 0) <= step] if step else []
        write_text_atomic(path, "".join(json_line(record) for record in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Appends one record to the log at `path` (not rewritten atomically: a line torn by a kill is dropped by
    `read_metrics`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json_line(record))
