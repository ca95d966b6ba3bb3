"""One writer per directory (lorakit.io.lock): a second holder is refused at once naming the first, a kill -9 of
the holder releases the lock, and nothing of the lock is left once it is released."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from lorakit.io.lock import LOCK_NAME, exclusive

HOLD = """
import sys, time
from lorakit.io.lock import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path):
    with exclusive(tmp_path / "run"):
        with pytest.raises(ValueError) as caught, exclusive(tmp_path / "run"):
            pass
        message = str(caught.value)
        assert f"--out {tmp_path / 'run'} is in use by another lorakit run" in message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert (tmp_path / "run" / LOCK_NAME).is_file()
    assert not (tmp_path / "run").exists()  # made for the lock, empty after it: removed


def test_a_directory_that_was_there_or_got_files_is_kept_without_the_lock_file(tmp_path):
    (tmp_path / "kept").mkdir()
    with exclusive(tmp_path / "kept"):
        pass
    with exclusive(tmp_path / "made"):
        (tmp_path / "made" / "adapter_config.json").write_text("{}")
    assert sorted(os.listdir(tmp_path / "kept")) == []
    assert sorted(os.listdir(tmp_path / "made")) == ["adapter_config.json"]


def test_a_kill_of_the_holder_releases_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {holder.pid} on"), exclusive(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(tmp_path):  # the kernel released it with the dead process's descriptors: no stale pid file
        assert (tmp_path / LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
