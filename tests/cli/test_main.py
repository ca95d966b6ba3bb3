"""The `lorakit` command itself (lorakit.cli.main): the installed entry points, the exit codes and the one-line
messages every sub-command shares, and a closed pipe."""

import warnings
from pathlib import Path

import pytest
from helpers import saved_small

import lorakit
import lorakit.cli.rank
from lorakit.cli import main


@pytest.mark.parametrize("entry", ["script", "module"])
def test_installed_command_and_module_exit_2_without_traceback(tmp_path, entry):
    import subprocess
    import sys

    # the console script pip installed next to this interpreter, and `python -m lorakit`
    command = [str(Path(sys.executable).parent / "lorakit")] if entry == "script" else [sys.executable, "-m", "lorakit"]
    result = subprocess.run([*command, "rank", str(tmp_path / "missing.csv")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"lorakit: error: no such file: {tmp_path / 'missing.csv'}"


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # as `lorakit inspect --json | head -c1` once head has exited
    with os.fdopen(write_end, "wb") as closed:
        argv = [sys.executable, "-m", "lorakit", "inspect", saved_small(tmp_path, "a"), "--json"]
        result = subprocess.run(argv, stdout=closed, stderr=subprocess.PIPE, text=True)
    assert (result.returncode, result.stderr) == (1, "")


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lorakit {lorakit.__version__}\n"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def command_doing(monkeypatch, action):
    """`lorakit rank` made to run `action` instead (the parser takes each command's run when main builds it)."""
    monkeypatch.setattr(lorakit.cli.rank, "run", lambda args: action())


def test_a_warning_is_one_plain_line_and_pythons_display_comes_back_after(capsys, monkeypatch):
    command_doing(monkeypatch, lambda: warnings.warn("a tied head stays as it was", UserWarning, stacklevel=1))
    before = warnings.showwarning
    assert main(["rank", "--example"]) == 0
    assert capsys.readouterr().err == "warning: a tied head stays as it was\n"
    assert warnings.showwarning is before


@pytest.mark.parametrize(
    "error, code, line",
    [
        (ValueError("--rank must be positive"), 2, "lorakit: error: --rank must be positive"),
        (FileNotFoundError("no such file: x.npy"), 2, "lorakit: error: no such file: x.npy"),
        (OSError(), 2, "lorakit: error: OSError"),  # no message: its kind at least
        (KeyboardInterrupt(), 130, "lorakit: interrupted"),
    ],
    ids=["value-error", "file-not-found", "bare-os-error", "ctrl-c"],
)
def test_expected_failures_end_in_one_line_and_their_exit_code(capsys, monkeypatch, error, code, line):
    def fail():
        raise error

    command_doing(monkeypatch, fail)
    assert main(["rank", "--example"]) == code
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_is_a_traceback_not_an_error_line(monkeypatch):
    command_doing(monkeypatch, lambda: [][0])
    with pytest.raises(IndexError):
        main(["rank", "--example"])
