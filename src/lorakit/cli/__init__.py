"""The `lorakit` command: a thin argparse front over the library, one module per sub-command.

Bad input of any kind ends in one line on stderr, `lorakit: error: ...`, and exit code 2, as argparse
does for bad flags; tracebacks are for bugs only.

Each command module has `add_parser(sub)`, registered in COMMANDS, and the function its parser runs. Building
the parser imports every command module, so that `lorakit --help` answers at once only where none imports torch,
transformers or matplotlib at its top: a module's top imports the standard library, rich and lorakit's torch-free
modules (lorakit.options, cli.arguments, the config dataclasses, io.console); its run function imports the library
it drives (`from lorakit.tools.resize import resize`). tests/cli/test_main.py checks it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from lorakit import __version__
from lorakit.cli import demo, finetune, generate, merge, predict, rank, study, svd

__all__ = ["main"]

CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")  # what would break or garble the one error line

COMMANDS = (demo, finetune, generate, merge, predict, rank, study, svd)


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
    print(f"warning: {one_line(str(message))}", file=sys.stderr if file is None else file)


def one_line(text: str) -> str:
    """`text` on one line: a line break or other control character (a path may hold one) shown escaped, as "\\n"."""
    return CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


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
        message = one_line(str(error)) or type(error).__name__
        print(f"lorakit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    return 0
