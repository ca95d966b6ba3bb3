"""The `lorakit` command: a thin argparse front over the library, one module per sub-command.

Bad input of any kind ends in one line on stderr, `lorakit: error: ...`, and exit code 2, as argparse
does for bad flags; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from lorakit import __version__
from lorakit.cli import demo, finetune, generate, merge, rank, svd

__all__ = ["main"]

COMMANDS = (demo, finetune, generate, merge, rank, svd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA for PyTorch: low-rank tools, adapters, PEFT-compatible files.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings as one plain line, like the command's own, without Python's file name and source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """`lorakit ...`: runs one command; returns 0, 2 for bad usage or input (one `lorakit: error:` line), 1
    when the reader of its output went away, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores Python's own display when the command returns
            warnings.showwarning = _show_warning
            args.run(args)
    except BrokenPipeError:  # the reader went away (`lorakit inspect --json | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit's flush fails once more
        return 1  # as rich does for what it prints, and Python for a closed pipe
    except (ValueError, OSError) as error:
        message = str(error) or type(error).__name__
        print(f"lorakit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    return 0
