"""The console lorakit's commands print to: rich, no syntax colouring of numbers, and 120 columns (or $COLUMNS)
when the output is a file or a pipe (rich's default of 80 wraps most tables); its progress display, a bar on a
terminal and a plain line every few seconds elsewhere, so that a log under nohup shows the run going; and names
cut to fit a table.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TaskID, TextColumn, TimeRemainingColumn

__all__ = ["PLAIN_EVERY", "PlainProgress", "make_console", "make_progress", "shorten_names"]

PLAIN_EVERY = 5.0  # seconds between two progress lines in a file or a pipe
SHORTEST_NAME = 16  # `shorten_names` cuts no name shorter, whatever the width


def make_console(stderr: bool = False) -> Console:
    """lorakit's rich console: no syntax colouring of numbers, lines kept whole, 120 columns when not a terminal
    (unless $COLUMNS says otherwise)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 120  # None: rich's own choice
    return Console(highlight=False, soft_wrap=True, stderr=stderr, width=width)


def make_progress(console: Console, disable: bool = False) -> Progress:
    """The progress display of a long loop: on a terminal a bar (description, bar, done / total, time left); into a
    file or a pipe plain lines (`PlainProgress`); nothing with `disable`. Used as rich's Progress: `with
    make_progress(console) as progress: task = progress.add_task(...); progress.update(task, advance=1)`."""
    if console.is_interactive or console.is_jupyter or disable:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        return Progress(*columns, console=console, disable=disable)
    return PlainProgress(console)


class PlainProgress(Progress):
    """rich's Progress for a file or a pipe, where a bar shows nothing until it ends: one plain line per task every
    `every` seconds, as it is updated, and one when it is done,

        loss 0.4567 · 5,355 tok/s: 120/500 (24%), 0:00:31 elapsed, 0:01:38 left
        loss 0.1234 · 5,360 tok/s: 500/500 (100%), done in 0:02:10

    `get_time` is the clock (rich's own parameter: tests pass a fake one)."""

    def __init__(
        self, console: Console, every: float = PLAIN_EVERY, get_time: Callable[[], float] | None = None
    ) -> None:
        super().__init__(console=console, disable=True, get_time=get_time)  # tasks are kept, no live display
        self.every = every
        self.shown: dict[TaskID, tuple[float, float]] = {}  # task → (time, completed) of its last line

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self.show_if_due(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self.show_if_due(task_id)

    def stop(self) -> None:
        for task in self.tasks:  # where the last line is not the task's end: one more, for the state it ended in
            if task.started and self.shown.get(task.id, (None, None))[1] != task.completed:
                self.show(task)
        super().stop()

    def show_if_due(self, task_id: TaskID) -> None:
        task = next(task for task in self.tasks if task.id == task_id)
        if not task.started:
            return
        last_time, last_completed = self.shown.get(task_id, (task.start_time, None))
        if (task.finished and last_completed != task.completed) or self.get_time() - last_time >= self.every:
            self.show(task)

    def show(self, task: Task) -> None:
        self.shown[task.id] = (self.get_time(), task.completed)
        self.console.print(f"{task.description}: {progress_text(task)}")


def progress_text(task: Task) -> str:
    """How far a task is, in words: "120/500 (24%), 0:00:31 elapsed, 0:01:38 left", or "500/500 (100%), done in
    0:02:10"."""
    done = f"{task.completed:,.0f}"
    if task.total is not None:
        done += f"/{task.total:,.0f} ({task.percentage:.0f}%)"
    if task.finished:
        return f"{done}, done in {_clock(task.finished_time or task.elapsed)}"
    left = f", {_clock(task.time_remaining)} left" if task.time_remaining is not None else ""
    return f"{done}, {_clock(task.elapsed)} elapsed{left}"


def _clock(seconds: float | None) -> str:
    return str(timedelta(seconds=max(0, int(seconds or 0))))


def shorten_names(names: Sequence[str], width: int) -> dict[str, str]:
    """{name: the name in about `width` characters (SHORTEST_NAME at least), its start given up for "…"}: the end of
    a layer's name tells it apart ("…layers.0.self_attn.q_proj" from "…layers.0.self_attn.k_proj"). Each keeps as
    much more of its end as it takes for no two to come out alike ("…0.self_attn.q_proj", "…1.self_attn.q_proj")."""
    keep = max(width, SHORTEST_NAME) - 1  # the characters kept after "…"
    while len({_end(name, keep) for name in names}) < len(set(names)):
        keep += 1
    return {name: _end(name, keep) for name in names}


def _end(name: str, keep: int) -> str:
    return name if len(name) <= keep + 1 else "…" + name[len(name) - keep :]
