"""One writer per directory: an exclusive lock, held by the operating system, on a file inside it.

    with exclusive(Path("run")):   # a second process gets a ValueError at once, naming this one
        ...

The lock is the kernel's (flock on POSIX, a byte-range lock on Windows): a process that dies, kill -9 included,
releases it with its file descriptors, so it never goes stale as a pid file does. The file records the holder's
pid and host for the message a second process gets, and is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "exclusive"]

LOCK_NAME = ".lorakit.lock"

if os.name == "nt":  # pragma: no cover (Windows)
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@contextmanager
def exclusive(directory: str | os.PathLike, what: str = "--out") -> Iterator[None]:
    """Holds an exclusive lock on `directory` (created if missing) for the length of the block.

    Args:
        directory: the directory to own; a directory this call creates is removed again on exit where it is
            still empty (a run refused before writing anything leaves nothing behind).
        what: how the refusal names the directory ("--out").

    Raises:
        ValueError: another process holds the lock: at once, naming its pid and host.
        OSError: the directory or its lock file cannot be made.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = _acquire(path, directory, what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        # removed while still held: a process that opens the name afterwards makes a new file (see _acquire)
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # it holds what the block wrote: kept
                directory.rmdir()


def _acquire(path: Path, directory: Path, what: str) -> int:
    """An open descriptor of lock file `path`, locked; the one that names the current file at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            holder = _holder(fd)
            os.close(fd)
            raise ValueError(
                f"{what} {directory} is in use by another lorakit run ({holder}): wait for it to end, or choose "
                f"another {what}"
            )
        try:  # the previous holder may have removed the file between our open and our lock: then lock anew
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file: "pid N on HOST" (or a vaguer word while it has not yet)."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that has just started"
