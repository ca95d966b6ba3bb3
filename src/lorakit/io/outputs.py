"""Where a command may write, checked before any work: every command that writes calls `check_output` for each
path it writes, with the paths it reads.

An output never lands on an input: `finetune --model M --out M` would write adapter_config.json into the model
directory (after which transformers applies the adapter whenever M loads), `extract M T --out M` likewise, and
`--out .` around the data would mix a run with it. And an output that cannot be written is found before the model
loads, not after the first hour of training.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from lorakit.io.atomic import cannot_write

__all__ = ["check_output", "check_writable"]


def check_output(
    out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]], flag: str = "--out"
) -> Path:
    """Refuses an output path that is empty, equal to an input, inside one or containing one, or cannot be
    written; the checks read nothing and leave nothing behind.

    Args:
        out: the file or directory the command writes.
        inputs: (what, path) for each file or directory the command reads ("model", "adapter", ...); a None
            path is skipped (an optional input not given).
        flag: how the command line names `out`, for the message.

    Returns:
        `out` as a Path (with "~" expanded).

    Raises:
        ValueError: an empty `out` (which would be the current directory), or one equal to, inside or containing
            an input, naming both.
        OSError: `out` cannot be written (see `check_writable`).
    """
    if not str(out).strip():
        raise ValueError(f"{flag} must not be empty")
    out = Path(out).expanduser()
    where = out.resolve()
    for what, path in inputs:
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        if where == source:
            raise ValueError(f"{flag} {out} is the {what} {path}: choose an {flag} apart from the inputs")
        if source in where.parents:
            raise ValueError(f"{flag} {out} is inside the {what} {path}: choose an {flag} apart from the inputs")
        if where in source.parents:
            raise ValueError(f"{flag} {out} contains the {what} {path}: choose an {flag} apart from the inputs")
    check_writable(out)
    return out


def check_writable(out: Path) -> None:
    """Refuses an `out` that cannot be written: the nearest existing directory on its way (itself where it is a
    directory) must take a new file, which is made and removed at once.

    Raises:
        OSError: it cannot (read-only file system, permissions, a file where a directory must be), naming `out`.
    """
    directory = out if out.is_dir() else out.parent  # a file `out` is replaced by a new file beside it
    while not directory.is_dir():
        if directory.exists() or directory.is_symlink():  # a file (or a dangling link) on the way
            raise NotADirectoryError(errno.ENOTDIR, f"cannot write {out}: {directory} is not a directory")
        directory = directory.parent
    probe = directory / f".lorakit-write-test.{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as error:
        raise cannot_write(error, out) from None
