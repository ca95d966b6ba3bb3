"""Atomic writes: a file or a directory appears complete at its final path, or not at all.

Everything lorakit writes goes to a temporary sibling first and is renamed into place, so a crash
mid-write never leaves a half-written file where a good one stood.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "write_text_atomic"]


def _chmod_default(path: Path, mode: int) -> None:
    """Gives `path` the permissions a plain open()/mkdir() would: `mode` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on a clean exit it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    _chmod_default(tmp, 0o666)  # mkstemp makes it private (0600)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; on a clean exit it replaces `path`.

    Entries of an existing `path` that the new directory does not have (say, checkpoints beside an
    adapter) are moved into it first, one rename each, so nothing else in the folder is lost. The old
    directory is then renamed aside and the new one renamed in: at every instant `path` holds the old
    complete files or the new complete ones, never a half-written mix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    _chmod_default(tmp, 0o777)  # mkdtemp makes it private (0700); a saved adapter is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    moved = []
    try:
        for entry in path.iterdir():
            if not (tmp / entry.name).exists():
                os.replace(entry, tmp / entry.name)
                moved.append(entry.name)
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, aside / "previous")
        os.replace(tmp, path)
    except BaseException:
        for name in moved:  # put the other entries back where they were
            os.replace(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
