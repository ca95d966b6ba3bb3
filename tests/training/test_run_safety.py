"""Nothing lost: a run owns its --out (a second run into it is refused at once, the first unaffected), and a kill -9
at any write point of the last checkpoint, its pruning and the final save leaves an --out that a --resume completes
bit for bit as an uninterrupted run, with no stray file left."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, cli_error, finetune_args

from lorakit.cli import main
from lorakit.io.lock import LOCK_NAME

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the files of dir_fd calls through /proc"),
]

# `lorakit finetune` that counts every creation (of a directory, or of a file through os.open: the temporaries of
# lorakit.io.atomic and the lock), rename and removal under --out (argv[1]) and, right after the one numbered
# argv[2], kills itself with SIGKILL, as kill -9 would; 0: never. Each is logged, one line each, to the file argv[3].
DRIVER = """
import os, shutil, signal, sys
from lorakit.cli import main

out, kill_at, log = os.path.realpath(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], "w")
count = 0

def where(name, dir_fd):
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
    return os.path.realpath(os.path.join(base, os.fsdecode(name)))

def watched(real):
    def call(*args, **kwargs):
        global count
        path = where(args[0], kwargs.get("dir_fd", kwargs.get("src_dir_fd")))
        result = real(*args, **kwargs)  # one that fails (removing what is gone) changes nothing: not counted
        creates = real is not os_open or (len(args) > 1 and args[1] & os.O_CREAT)  # an open for reading: not one
        if creates and path.startswith(out):
            count += 1
            log.write(f"{real.__name__} {os.path.relpath(path, out)}\\n")
            log.flush()
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call

os_open = os.open
for name in ("mkdir", "open", "replace", "rename", "unlink", "rmdir"):
    setattr(os, name, watched(getattr(os, name)))
sys.exit(main(sys.argv[4:]))
"""

ARGS = ("--steps", "3", "--save-every", "1", "--keep-checkpoints", "1", "--batch-size", "4")


def driven(model, data, out: Path, kill_at: int, log: Path, *extra) -> subprocess.CompletedProcess:
    argv = [str(a) for a in finetune_args(model, data, out, *ARGS, *extra)]
    return subprocess.run(
        [PYTHON, "-c", DRIVER, str(out), str(kill_at), str(log), *argv], capture_output=True, text=True
    )


def files(out: Path) -> dict[str, bytes]:
    """Every file under `out` (hidden ones included), by relative path: the adapter and the run's files by their
    bytes; the log, plot and run settings, which hold timings or paths, by their presence."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(out))
            volatile = path.name in ("metrics.jsonl", "loss.png", "train_config.json")
            found[name] = b"" if volatile else path.read_bytes()
    return found


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_kill_at_every_write_point_of_the_final_save_and_pruning_resumes_bit_for_bit(
    tiny_llama, word_data, tmp_path, capsys
):
    reference = tmp_path / "reference"
    record = driven(tiny_llama, word_data, reference, 0, tmp_path / "events")
    assert record.returncode == 0, record.stderr
    events = (tmp_path / "events").read_text().splitlines()
    first = next(i for i, event in enumerate(events) if "step-000003" in event)  # the last checkpoint's save
    points = list(range(first, len(events)))  # killed after event k: from just before that save to the last one
    kinds = {event.split()[0] for event in events[first:]}
    # creations, renames and removals: of the last checkpoint, of the pruning of the one before, of the final save
    assert len(points) >= 12 and {"mkdir", "open", "replace", "unlink", "rmdir"} <= kinds, events[first:]
    expected = files(reference)
    assert LOCK_NAME not in expected and not any(Path(name).name.startswith(".") for name in expected)
    for point in points:
        out = tmp_path / f"killed-at-{point}"
        killed = driven(tiny_llama, word_data, out, point, tmp_path / f"events-{point}")
        assert killed.returncode == -9, (point, events[point - 1], killed.stderr)  # (events counts from 1)
        assert main([*finetune_args(tiny_llama, word_data, out, *ARGS), "--resume"]) == 0, events[point - 1]
        assert files(out) == expected, (point, events[point - 1], sorted(files(out)))  # bit for bit, nothing stray
        assert steps_logged(out) == [1, 2, 3]
    capsys.readouterr()


HOLDER = """
import sys
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_run_into_the_same_out_is_refused_at_once_and_the_first_is_unaffected(
    tiny_llama, word_data, tmp_path, capsys, monkeypatch
):
    args = ("--steps", "150", "--batch-size", "4")
    alone = tmp_path / "alone"
    assert main(finetune_args(tiny_llama, word_data, alone, *args)) == 0
    out = tmp_path / "shared"
    first = subprocess.Popen(
        [PYTHON, "-c", HOLDER, *map(str, finetune_args(tiny_llama, word_data, out, *args))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = out / LOCK_NAME
        while not (lock.is_file() and lock.read_text()):  # the first run holds --out
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)

        def never_loaded(*args, **kwargs):
            raise AssertionError("the second run got as far as loading the model")

        monkeypatch.setattr("lorakit.training.loop.load_model_and_tokenizer", never_loaded)
        err = cli_error(finetune_args(tiny_llama, word_data, out, *args), capsys)
        assert f"--out {out} is in use by another lorakit run (pid {first.pid} on " in err
        assert len(err.splitlines()) == 1
        assert first.poll() is None  # refused while the first still ran
    finally:
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (alone / "adapter_model.safetensors").read_bytes()
    assert steps_logged(out) == list(range(1, 151))  # one log, in order: nothing interleaved
    assert sorted(os.listdir(out)) == sorted(os.listdir(alone))  # the lock gone with the run
