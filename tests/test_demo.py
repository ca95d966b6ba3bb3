"""`lorakit demo --quick`: the experiment's invariants, not just its files."""

import json
import re

import pytest
from conftest import cli_error

import lorakit as lk
from lorakit.cli import main
from lorakit.demo.experiment import LAYERS, low_rank_view, oversized_mlp


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_have_the_contract_keys(demo_run):
    _, m = demo_run
    keys = {
        "seed", "worst_digit", "errors_before", "errors_lora", "errors_disabled", "errors_replay",
        "accuracy_before", "accuracy_lora", "accuracy_disabled", "accuracy_replay", "params_original",
        "params_lora", "delta_ranks", "disabled_equals_original", "merged_max_abs_diff", "adapter_bytes", "seconds",
    }  # fmt: skip
    assert keys <= set(m)
    for key in ("errors_before", "errors_lora", "errors_disabled", "errors_replay"):
        assert len(m[key]) == 10 and all(isinstance(e, int) for e in m[key])


def test_switching_lora_off_gives_back_the_original_network(demo_run):
    _, m = demo_run
    assert m["disabled_equals_original"] is True
    assert m["errors_disabled"] == m["errors_before"]
    assert m["accuracy_disabled"] == m["accuracy_before"]


def test_lora_fixes_the_worst_digit_and_replay_keeps_overall_accuracy(demo_run):
    _, m = demo_run
    worst = m["worst_digit"]
    assert m["errors_before"][worst] == max(m["errors_before"])
    assert m["errors_lora"][worst] < m["errors_before"][worst]
    assert m["errors_replay"][worst] < m["errors_before"][worst]
    assert m["accuracy_replay"] > m["accuracy_lora"]  # replay undoes the forgetting
    assert m["accuracy_replay"] >= m["accuracy_before"] - 0.02


def test_parameter_counts_and_update_ranks(demo_run):
    _, m = demo_run
    r = m["rank"]
    layers = [(64, 1000), (1000, 2000), (2000, 10)]
    assert m["params_lora"] == sum(r * (n_in + n_out) for n_in, n_out in layers)
    assert m["params_original"] == sum(n_in * n_out + n_out for n_in, n_out in layers)
    assert len(m["delta_ranks"]) == 3 and all(1 <= k <= r for k in m["delta_ranks"])


def test_merged_outputs_equal_unmerged_and_adapter_is_small(demo_run):
    out, m = demo_run
    assert m["merged_max_abs_diff"] < 1e-5
    assert m["adapter_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    assert m["adapter_bytes"] < m["base_model_bytes"] / 100


def test_report_references_only_images_that_exist(demo_run):
    out, _ = demo_run
    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) >= 3
    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_the_same_numbers(demo_run, tmp_path):
    _, first = demo_run
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "0"]) == 0
    second = json.loads((tmp_path / "metrics.json").read_text())
    for m in (first, second):
        m.pop("seconds")
    assert first == second


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


def test_low_rank_view_with_a_rank_past_the_smallest_layer_keeps_all_energy():
    model = lk.inject(oversized_mlp(), lk.LoraConfig(r=12, target_modules=list(LAYERS)))  # linear3 is 10 × 2000
    rows, _ = low_rank_view(model, 12)
    assert [row["energy_top_12"] for row in rows][-1] == 1.0


def test_unwritable_out_exits_2_with_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: cannot write to --out") and err.count("\n") == 1
