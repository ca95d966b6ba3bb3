"""The console and its progress display (lorakit.io.console): a bar on a terminal, plain lines every few seconds
into a file or a pipe, $COLUMNS honoured, and long names cut from their start without two coming out alike."""

import io

import pytest
from rich.console import Console
from rich.progress import Progress

from lorakit.io.console import PLAIN_EVERY, PlainProgress, make_console, make_progress, shorten_names


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def piped_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120), out


def test_into_a_pipe_progress_is_a_plain_line_every_few_seconds_and_one_at_the_end():
    console, out = piped_console()
    clock = Clock()
    with PlainProgress(console, every=5.0, get_time=clock) as progress:
        task = progress.add_task("training", total=30)
        for step in range(1, 31):  # a step a second
            clock.now += 1.0
            progress.update(task, advance=1, description=f"loss {1 / step:.3f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "loss 0.200: 5/30 (17%), 0:00:05 elapsed, 0:00:25 left"
    assert [line.split(":")[1].split()[0] for line in lines] == ["5/30", "10/30", "15/30", "20/30", "25/30", "30/30"]
    assert lines[-1] == "loss 0.033: 30/30 (100%), done in 0:00:30"


def test_a_task_that_ends_between_two_lines_gets_its_last_line_when_the_display_stops():
    console, out = piped_console()
    clock = Clock()
    with PlainProgress(console, every=5.0, get_time=clock) as progress:
        task = progress.add_task("resumed", total=100, completed=40)
        for _ in range(3):
            clock.now += 1.0
            progress.update(task, advance=1)
    assert out.getvalue() == "resumed: 43/100 (43%), 0:00:03 elapsed, 0:00:57 left\n"


def test_make_progress_draws_a_bar_on_a_terminal_plain_lines_elsewhere_and_nothing_when_disabled():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert type(make_progress(terminal)) is Progress
    console, out = piped_console()
    plain = make_progress(console)
    assert isinstance(plain, PlainProgress) and plain.every == PLAIN_EVERY
    with make_progress(console, disable=True) as progress:
        progress.update(progress.add_task("quiet", total=2), advance=2)
    assert out.getvalue() == ""
    with plain:
        plain.update(plain.add_task("quick", total=2), advance=2)
    assert out.getvalue().startswith("quick: 2/2 (100%), done in 0:00:0")


@pytest.mark.parametrize("columns, width", [(None, 120), ("77", 77)])
def test_a_console_into_a_pipe_is_120_columns_wide_unless_columns_says_otherwise(monkeypatch, columns, width):
    monkeypatch.delenv("COLUMNS", raising=False)
    if columns is not None:
        monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert make_console().width == width


LLAMA = [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1, 10) for m in "qkvo"]


def test_names_are_cut_from_their_start_and_keep_what_tells_them_apart():
    cut = shorten_names(LLAMA, 20)
    assert cut["model.layers.0.self_attn.q_proj"] == "….0.self_attn.q_proj"
    assert cut["model.layers.10.self_attn.o_proj"] == "…10.self_attn.o_proj"
    assert {len(name) for name in cut.values()} == {20}
    narrow = shorten_names(LLAMA, 8)  # too narrow for the layer number: each name keeps as much as it needs
    assert len(set(narrow.values())) == len(LLAMA)
    assert narrow["model.layers.1.self_attn.k_proj"].endswith(".1.self_attn.k_proj")
    assert shorten_names(["short", "model.layers.0.mlp.up_proj"], 40) == {
        "short": "short",
        "model.layers.0.mlp.up_proj": "model.layers.0.mlp.up_proj",
    }
