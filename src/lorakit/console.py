"""The console lorakit's commands print to: rich, no syntax colouring of numbers, and 120 columns when the
output is a file or a pipe (rich's default of 80 wraps most tables)."""

from __future__ import annotations

import sys

from rich.console import Console

__all__ = ["make_console"]


def make_console(stderr: bool = False) -> Console:
    """lorakit's rich console: no syntax colouring of numbers, lines kept whole, 120 columns when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 120
    return Console(highlight=False, soft_wrap=True, stderr=stderr, width=width)
