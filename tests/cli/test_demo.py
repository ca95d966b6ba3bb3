"""`lorakit demo` (lorakit.cli.demo): flags out of range, an empty or unwritable --out, each one line and exit
code 2, with nothing written. (The experiment itself: tests/demo/test_experiment.py.)"""

import pytest
from helpers import cli_error

from lorakit.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--alpha", "nan"], "--alpha must be a finite, non-zero number (the update is scaled by α/r), got nan"),
        (["--alpha", "0"], "--alpha must be a finite, non-zero number (the update is scaled by α/r), got 0.0"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**32)], f"--seed must be in [0, 2**32), got {2**32}"),
    ],
)
def test_out_of_range_flags_exit_2_with_one_line(capsys, tmp_path, argv, message):
    err = cli_error(["demo", "--quick", "--out", str(tmp_path / "out"), *argv], capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_empty_out_is_refused_not_taken_for_the_current_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = cli_error(["demo", "--quick", "--out", ""], capsys)
    assert err.strip() == "lorakit: error: --out must not be empty"
    assert not any(tmp_path.iterdir())


def test_a_flag_of_the_wrong_type_exits_2_with_usage(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", "--out", str(tmp_path), "--rank", "two"])
    assert exit_.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_unwritable_out_exits_2_with_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error:") and f"cannot write {blocker / 'sub'}" in err and err.count("\n") == 1
