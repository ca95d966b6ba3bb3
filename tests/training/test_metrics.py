"""A run's log, metrics.jsonl (lorakit.training.metrics): standard JSON lines, a torn last line dropped, cut back
to a resumed checkpoint's step."""

import json

import pytest
from helpers import metrics_text

from lorakit.training.metrics import append_metrics, json_line, keep_metrics_until, read_metrics


def test_a_diverged_loss_is_logged_as_null_which_is_json():
    line = json_line({"step": 3, "loss": float("nan"), "lr": float("inf"), "epoch": 0.5})
    assert line == '{"step": 3, "loss": null, "lr": null, "epoch": 0.5}\n'
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_read_metrics_drops_a_torn_last_line_and_refuses_a_bad_line_before_it(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(metrics_text({"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}) + '{"step": 3, "lo')
    assert read_metrics(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    keep_metrics_until(log, 1)
    assert log.read_text() == metrics_text({"step": 1, "loss": 2.0})
    log.write_text('{"step": 1, "lo\n' + metrics_text({"step": 2, "loss": 1.5}))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not valid JSON"):
        read_metrics(log)


def test_appended_records_are_one_json_line_each_in_a_directory_made_for_them(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    append_metrics(log, {"step": 1, "loss": 2.0})
    append_metrics(log, {"step": 2, "loss": float("inf")})
    assert log.read_text() == metrics_text({"step": 1, "loss": 2.0}, {"step": 2, "loss": None})
    assert read_metrics(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}]


def test_a_run_from_step_0_starts_its_log_afresh_and_a_missing_log_stays_missing(tmp_path):
    log = tmp_path / "metrics.jsonl"
    keep_metrics_until(log, 3)
    assert not log.exists()
    log.write_text(metrics_text({"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}))
    keep_metrics_until(log, 0)
    assert log.read_text() == ""


def test_resuming_keeps_the_lines_up_to_the_checkpoints_step_and_those_without_a_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"eval_loss": 3.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    log.write_text(metrics_text(*records) + '{"step": 4, "lo')  # and a line a kill tore
    keep_metrics_until(log, 2)
    assert log.read_text() == metrics_text(*records[:3])
