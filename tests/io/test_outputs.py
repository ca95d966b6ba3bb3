"""Where a command may write (lorakit.io.outputs): never on, inside or around an input, never "", and only where
a file can be made, all found without writing anything."""

from pathlib import Path

import pytest
from helpers import tree

from lorakit.io.outputs import check_output


@pytest.fixture
def inputs(tmp_path) -> list[tuple[str, Path]]:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n')
    return [("model directory", tmp_path / "model"), ("data", tmp_path / "data.jsonl"), ("eval data", None)]


@pytest.mark.parametrize(
    "out, message",
    [
        ("model", "is the model directory"),
        ("model/adapter", "is inside the model directory"),
        ("model/./sub/../adapter", "is inside the model directory"),
        (".", "contains the model directory"),
        ("data.jsonl", "is the data"),
    ],
)
def test_an_output_on_inside_or_around_an_input_is_refused_and_nothing_written(tmp_path, inputs, out, message):
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=message):
        check_output(tmp_path / out, inputs)
    assert tree(tmp_path) == before


def test_an_output_reached_through_a_link_is_the_input_it_points_to(tmp_path, inputs):
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(ValueError, match="is the model directory"):
        check_output(tmp_path / "link", inputs)


@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_output_is_refused_not_read_as_the_current_directory(inputs, out):
    with pytest.raises(ValueError, match="--out must not be empty"):
        check_output(out, inputs)


def test_an_output_beside_the_inputs_passes_and_leaves_nothing_behind(tmp_path, inputs):
    before = tree(tmp_path)
    assert check_output(tmp_path / "runs" / "one", inputs) == tmp_path / "runs" / "one"
    assert tree(tmp_path) == before  # not even the directory: the probe goes where it would be made


def test_an_output_that_cannot_be_written_is_found_before_any_work():
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no file can be made, even by root")
    with pytest.raises(OSError, match="cannot write /proc/lorakit-out: "):
        check_output("/proc/lorakit-out", [])


def test_an_output_under_a_file_names_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"cannot write {tmp_path / 'file' / 'out'}: .* is not a directory"):
        check_output(tmp_path / "file" / "out", [], "--plot")
