"""Atomic writes: a file appears complete at its final path or not at all; so does a new directory, and each
entry written into an existing one.

Everything lorakit writes goes to a temporary sibling first, is flushed to disk (fsync) and renamed into
place, and the rename is flushed too, so neither a crash mid-write nor a power loss after a completed
write leaves a half-written file where a good one stood. Entries written into an existing directory can appear
as a unit (`atomic_dir(..., commit=NAME)`: an adapter's two files), a directory is removed at once (`remove_tree`),
and what a kill interrupts is left under hidden names that `remove_leftovers` recognises. An OSError while writing
(a full disk) names the destination, never a temporary.

The temporary siblings are created with os.open / os.mkdir and the permissions a plain open() / mkdir()
would ask for (0666 / 0777), so the kernel applies the process umask itself: lorakit never reads or
changes the umask, which is process-wide state other threads may rely on.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_dir",
    "atomic_file",
    "cannot_write",
    "remove_leftovers",
    "remove_tree",
    "write_text_atomic",
    "writing",
]


TOKEN_HEX = 6  # bytes of randomness in a temporary name: 12 hex digits
LEFTOVER = re.compile(rf"\..+\.[0-9a-f]{{{2 * TOKEN_HEX}}}\.(tmp|old)")  # a name _sibling makes


def _sibling(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new hidden entry `.NAME.RANDOM<suffix>` beside `path`, made by `create` (which must fail if it exists)."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(TOKEN_HEX)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:  # a 48-bit name taken: as good as never, but never overwrite
            continue
        except OSError as error:
            raise cannot_write(error, path) from None
        return candidate


def cannot_write(error: OSError, path: Path) -> OSError:
    """`error` as one that names `path`, what the caller asked to write, not its temporary sibling."""
    if error.errno is None:  # no system error to restate
        return error
    return type(error)(error.errno, f"cannot write {path}: {error.strerror}")


def _rename_onto(source: Path, path: Path, named: Path | None = None) -> None:
    """os.replace(source, path), the one way this module renames; an error names `named` (default `path`), what
    the caller asked to write, never a temporary name."""
    try:
        os.replace(source, path)
    except OSError as error:
        raise cannot_write(error, path if named is None else named) from None


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_dir(path: Path) -> None:
    os.mkdir(path, 0o777)


def _fsync(path: Path) -> None:
    """Flushes the contents of file `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flushes directory `path` (its entries: creations and renames) to disk, where the system allows it."""
    if os.name == "posix":  # Windows cannot open a directory; its renames are durable once they return
        _fsync(path)


def _fsync_tree(root: Path) -> None:
    """Flushes every file and directory under `root` (and `root` itself) to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync_dir(Path(directory))


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError raised while writing for `path` (a full disk, a quota) restated to name `path`: the write()
    that fails names no file, and the temporary it writes to is no name the user knows."""
    try:
        yield
    except OSError as error:
        raise cannot_write(error, path) from None


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on a clean exit it is flushed to disk and renamed onto `path`.
    An OSError while writing it names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".tmp", _new_file)
    try:
        with writing(path):
            yield tmp
            _fsync(tmp)
        _rename_onto(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(path: str | os.PathLike, commit: str | None = None) -> Iterator[Path]:
    """Yields an empty temporary directory; on a clean exit what was written there is in `path`.

    Everything written is flushed to disk first, and an OSError while writing names `path`. A `path` that does not
    exist yet is the temporary directory (made beside it) renamed into place: complete or absent. Into an existing
    `path`, the temporary directory is made inside it (a kill leaves its leftovers there, for `remove_leftovers`),
    and each written entry is renamed over its namesake, one atomic rename each; the directory's other entries
    (the checkpoints and log of a training run beside its adapter, say) are never moved.

    `commit` names the entry that completes the written entries as a unit (an adapter's adapter_config.json, without
    which no reader takes its weights): its old version is removed before any entry is replaced and the new one
    renamed in last, so that a reader who requires it finds the old unit whole, no unit, or the new one whole,
    never an old entry beside a new one, whenever the writer is killed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    into = path.is_dir()
    tmp = _sibling(path / path.name if into else path, ".tmp", _new_dir)
    try:
        with writing(path):
            yield tmp
            _fsync_tree(tmp)
        if not into:
            _rename_onto(tmp, path)
            _fsync_dir(path.parent)
            return
        entries = sorted(tmp.iterdir(), key=lambda entry: (entry.name == commit, entry.name))  # the commit last
        if commit is not None and (tmp / commit).exists() and (path / commit).exists():
            _remove(path / commit)  # the old unit is incomplete from here on: no reader takes it any more
            _fsync_dir(path)
        for entry in entries:
            _replace_entry(entry, path / entry.name)
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Removes file `path`; an error names it."""
    try:
        os.unlink(path)
    except OSError as error:
        raise cannot_write(error, path) from None


def _replace_entry(new: Path, target: Path) -> None:
    """Renames `new` onto `target`; a directory over an existing one goes through an aside rename, since
    a rename cannot replace a directory that holds anything."""
    if not (new.is_dir() and target.is_dir()):
        _rename_onto(new, target)
        return
    aside = _sibling(target, ".old", _new_dir)
    _rename_onto(target, aside / target.name, named=target)
    try:
        _rename_onto(new, target)
    except BaseException:
        _rename_onto(aside / target.name, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Removes directory `path` so that it is gone at once: renamed to a hidden leftover name first (one atomic
    rename), then deleted. A kill during the deletion leaves a leftover for `remove_leftovers`, never a
    half-deleted directory under its own name."""
    path = Path(path)
    aside = _sibling(path, ".old", _new_dir)
    _rename_onto(path, aside / path.name, named=path)
    shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(directory: str | os.PathLike) -> None:
    """Removes the temporary siblings that writes into `directory` left behind when a kill interrupted them.
    Only for a directory that one writer owns (a training run's checkpoints/): it would also remove the
    temporary entries of another process's write in progress."""
    directory = Path(directory)
    for entry in directory.iterdir() if directory.is_dir() else []:
        if not LEFTOVER.fullmatch(entry.name):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
