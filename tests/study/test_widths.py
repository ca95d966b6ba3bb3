"""lorakit.study.widths: Li et al.'s finding reproduced on the digits, that d90 barely depends on the width."""

import pytest
from rich.console import Console

from lorakit.study.widths import WIDTHS, digits_mlp, scratch_digits_task, width_study


def test_the_widths_differ_at_least_fourfold_in_parameters():
    counts = [sum(p.numel() for p in digits_mlp(width).parameters()) for width in WIDTHS]
    assert counts == [3466, 26122]
    assert counts[1] / counts[0] >= 4


@pytest.mark.slow
def test_a_scratch_task_starts_near_chance():
    task = scratch_digits_task(32)
    assert task.evaluate(task.model) < 0.25
    assert task.train_examples == 1257 and task.eval_examples == 540


@pytest.mark.slow
def test_d90_of_the_digits_changes_little_with_the_width():
    narrow, wide = width_study(WIDTHS, seed=0, console=Console(quiet=True))
    assert wide["parameters"] / narrow["parameters"] >= 4
    for row in (narrow, wide):
        assert row["reference"] > 0.9  # trained in full, each reads the digits
        assert row["d90"] is not None and row["d90"] < row["parameters"] / 10
    assert 1 / 2 <= wide["d90"] / narrow["d90"] <= 2, (narrow["d90"], wide["d90"])
