"""The console lorakit's commands print to: rich, no syntax colouring of numbers, and 120 columns when the
output is a file or a pipe (rich's default of 80 wraps most tables); and its progress bars."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["make_console", "make_progress"]


def make_console(stderr: bool = False) -> Console:
    """lorakit's rich console: no syntax colouring of numbers, lines kept whole, 120 columns when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 120
    return Console(highlight=False, soft_wrap=True, stderr=stderr, width=width)


def make_progress(console: Console, disable: bool = False) -> Progress:
    """A progress bar for long loops: description, bar, done / total, time left."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, disable=disable)
