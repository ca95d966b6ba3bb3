"""Atomic writes (lorakit.io.atomic): entries of a directory that a write does not touch are never moved, a failed
rename leaves the old entry, completed writes are flushed to disk, and the process umask is never touched."""

import errno
import os
import stat
from pathlib import Path

import pytest
from helpers import tree

from lorakit.io.atomic import atomic_dir, atomic_file, remove_leftovers, remove_tree, write_text_atomic


def test_a_failed_rename_leaves_the_old_entry_and_never_moves_the_others(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "weights").write_bytes(b"old weights")
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "step-1").write_bytes(b"checkpoint")
    before = tree(directory)
    replace = os.replace
    renames = []

    def failing_replace(src, dst):
        renames.append((Path(src).name, Path(dst)))
        if Path(dst) == directory / "weights":
            raise OSError("rename failed")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(directory) as tmp:
        (tmp / "weights").write_bytes(b"new weights")
    assert tree(directory) == before
    assert all(dst.parent == directory and dst.name == "weights" for _, dst in renames)  # checkpoints never moved
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directory left


def test_a_written_directory_replaces_its_namesake_whole(tmp_path):
    directory = tmp_path / "adapter"
    (directory / "sub").mkdir(parents=True)
    (directory / "sub" / "old").write_bytes(b"old")
    with atomic_dir(directory) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new").write_bytes(b"new")
    assert tree(directory) == {"sub": None, "sub/new": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_dir_replaces_the_written_entries_and_keeps_the_others(tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "weights").write_bytes(b"old weights")
    (directory / "notes").write_bytes(b"notes")
    with atomic_dir(directory) as tmp:
        (tmp / "weights").write_bytes(b"new weights")
    assert tree(directory) == {"notes": b"notes", "weights": b"new weights"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def record_fsyncs_and_renames(monkeypatch) -> list[tuple]:
    """Patches os.fsync and os.replace to log ("fsync", path) and ("replace", src, dst), in order."""
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc (Linux)")
def test_atomic_file_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = record_fsyncs_and_renames(monkeypatch)
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    assert events == [("fsync", tmp), ("replace", tmp, tmp_path / "f.json"), ("fsync", tmp_path)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc (Linux)")
def test_atomic_dir_flushes_every_written_file_before_the_swap_and_the_folders_after(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "notes").write_text("kept")
    events = record_fsyncs_and_renames(monkeypatch)
    with atomic_dir(directory) as tmp:
        (tmp / "a").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("b")
    first_rename = next(i for i, e in enumerate(events) if e[0] == "replace")
    assert {e[1] for e in events[:first_rename]} == {tmp / "a", tmp / "sub" / "b", tmp / "sub", tmp}
    assert events[first_rename:] == [
        ("replace", tmp / "a", directory / "a"),
        ("replace", tmp / "sub", directory / "sub"),
        ("fsync", directory),
    ]


def test_temporary_files_get_the_permissions_of_a_plain_open_without_touching_the_umask(tmp_path, monkeypatch):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()

    def no_umask(mask):
        raise AssertionError("os.umask changes process-wide state: never call it")

    monkeypatch.setattr(os, "umask", no_umask)
    write_text_atomic(tmp_path / "atomic.txt", "x")
    with atomic_dir(tmp_path / "atomic") as tmp:
        (tmp / "f").write_text("x")
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("atomic.txt") == mode("plain.txt")
    assert mode("atomic") == mode("plain")


def test_a_write_that_cannot_start_names_the_destination_not_its_temporary():
    target = Path("/proc/lorakit-test.txt")  # a directory where no file can be made, even by root
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    with pytest.raises(FileNotFoundError, match=f"cannot write {target}: No such file or directory$"):
        write_text_atomic(target, "x")


def test_a_file_over_a_directory_names_the_destination_not_its_temporary(tmp_path):
    (tmp_path / "report.html").mkdir()
    with pytest.raises(IsADirectoryError, match=f"cannot write {tmp_path / 'report.html'}: Is a directory$"):
        write_text_atomic(tmp_path / "report.html", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def refuse_renames(monkeypatch):
    def fail(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(source), None, str(target))

    monkeypatch.setattr(os, "replace", fail)


@pytest.mark.parametrize("exists", [False, True], ids=["new-directory", "into-existing"])
def test_a_failed_rename_names_the_destination_not_the_temporary(tmp_path, monkeypatch, exists):
    directory = tmp_path / "out"
    if exists:
        with atomic_dir(directory) as tmp:
            (tmp / "a.txt").write_text("old")
    refuse_renames(monkeypatch)
    with pytest.raises(PermissionError) as caught, atomic_dir(directory) as tmp:
        (tmp / "a.txt").write_text("new")
    message = str(caught.value)
    assert str(directory) in message and ".tmp" not in message, message


def test_a_failed_rename_of_a_subdirectory_names_it_and_leaves_the_old_one(tmp_path, monkeypatch):
    directory = tmp_path / "out"
    with atomic_dir(directory) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("old")
    refuse_renames(monkeypatch)
    with pytest.raises(PermissionError) as caught, atomic_dir(directory) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("new")
    assert str(directory / "sub") in str(caught.value) and ".old" not in str(caught.value)
    assert (directory / "sub" / "a.txt").read_text() == "old"


# -- units, removals and full disks --------------------------------------------------------------------------------


class Killed(BaseException):
    """A kill at a chosen rename or removal, for the state it leaves on disk (what a reader then sees)."""


def kill_at(monkeypatch, n: int) -> list[str]:
    """Makes the n-th call of os.replace / os.unlink raise Killed; returns the calls made, for the caller to count."""
    calls, replace, unlink = [], os.replace, os.unlink

    def counted(real):
        def call(*args, **kwargs):
            calls.append(real.__name__)
            if len(calls) == n:
                raise Killed
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "replace", counted(replace))
    monkeypatch.setattr(os, "unlink", counted(unlink))
    return calls


def write_unit(directory: Path, text: str) -> None:
    with atomic_dir(directory, commit="adapter_config.json") as tmp:
        (tmp / "adapter_model.safetensors").write_text(f"weights {text}")
        (tmp / "adapter_config.json").write_text(f"config {text}")
        (tmp / "README.md").write_text(f"readme {text}")


def test_a_unit_is_seen_old_whole_absent_or_new_whole_whatever_rename_a_kill_stops(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    write_unit(directory, "old")
    points = 0
    while True:
        points += 1
        write_unit(directory, "old")
        calls = kill_at(monkeypatch, points)
        try:
            write_unit(directory, "new")
        except Killed:
            pass
        finally:
            monkeypatch.undo()
        seen = {p.name: p.read_text() for p in directory.iterdir() if not p.name.startswith(".")}
        if "adapter_config.json" in seen:  # what a reader takes: the config, and the weights beside it
            version = seen["adapter_config.json"].split()[1]
            assert seen["adapter_model.safetensors"] == f"weights {version}", (points, seen)
        if len(calls) < points:  # the write ran to its end: every rename and removal was tried
            assert seen == {
                "adapter_model.safetensors": "weights new",
                "adapter_config.json": "config new",
                "README.md": "readme new",
            }
            break
    assert points >= 4  # the old config's removal, three renames


def test_a_removed_tree_is_gone_at_once_and_a_killed_removal_leaves_a_leftover(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        (root / f"step-{step}").mkdir(parents=True)
        for name in ("a", "b", "c"):
            (root / f"step-{step}" / name).write_text(name)
    kill_at(monkeypatch, 2)  # the second file of step-1 deleted: a removal half done
    with pytest.raises(Killed):
        remove_tree(root / "step-1")
    monkeypatch.undo()
    names = sorted(p.name for p in root.iterdir())
    assert names[1:] == ["step-2"] and names[0].startswith(".step-1.") and names[0].endswith(".old")
    remove_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]


def test_a_full_disk_names_the_destination_not_a_temporary(tmp_path):
    def fill(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises: it names no file

    full = "No space left on device$"
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'out'}: {full}"), atomic_dir(tmp_path / "out") as tmp:
        fill(tmp)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'f'}: {full}"), atomic_file(tmp_path / "f") as tmp:
        fill(tmp)
    assert list(tmp_path.iterdir()) == []
