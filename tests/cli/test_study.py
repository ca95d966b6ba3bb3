"""`lorakit study` (lorakit.cli.study): bad flags and data, each one line and exit code 2, nothing trained or
written. (The study itself: tests/study/test_experiment.py.)"""

import os

import pytest
from helpers import cli_error

from lorakit.cli import main
from lorakit.io.lock import exclusive


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--data", "x.jsonl"], "--data and --eval-data go with --model"),
        (["--model", "m"], "--model needs --data and --eval-data"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, tmp_path, argv, message):
    err = cli_error(["study", "--quick", "--out", str(tmp_path / "out"), *argv], capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_data_files_exit_2_before_anything_is_written(capsys, tmp_path):
    argv = [
        "study",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "no.jsonl"),
        "--eval-data",
        "no.jsonl",
    ]
    err = cli_error([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "no data file at" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_study_into_an_out_that_another_process_holds_is_refused_at_once(capsys, tmp_path):
    out = tmp_path / "out"
    with exclusive(out):  # as a study or a run still going there holds it
        err = cli_error(["study", "--quick", "--out", str(out)], capsys)
        assert len(err.strip().splitlines()) == 1 and f"pid {os.getpid()}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lorakit.lock"]  # nothing of the study's


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("lorakit-study", "the demo's digit classifier", "seq-cls", "300 for the digits"):
        assert default in text
