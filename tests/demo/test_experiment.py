"""`lorakit demo --quick` (lorakit.demo): the experiment's invariants, not just its files. One run serves the
tests that take `demo_run` (tests/demo/conftest.py): they are slow (`-m "not slow"` leaves them out)."""

import json
import re

import pytest
from browser import check_page

import lorakit as lk
from lorakit.cli import main
from lorakit.demo.experiment import LAYERS, low_rank_view, oversized_mlp


@pytest.mark.slow
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


@pytest.mark.slow
def test_switching_lora_off_gives_back_the_original_network(demo_run):
    _, m = demo_run
    assert m["disabled_equals_original"] is True
    assert m["errors_disabled"] == m["errors_before"]
    assert m["accuracy_disabled"] == m["accuracy_before"]


@pytest.mark.slow
def test_lora_fixes_the_worst_digit_and_replay_keeps_overall_accuracy(demo_run):
    _, m = demo_run
    worst = m["worst_digit"]
    assert m["errors_before"][worst] == max(m["errors_before"])
    assert m["errors_lora"][worst] < m["errors_before"][worst]
    assert m["errors_replay"][worst] < m["errors_before"][worst]
    assert m["accuracy_replay"] > m["accuracy_lora"]  # replay undoes the forgetting
    assert m["accuracy_replay"] >= m["accuracy_before"] - 0.02


@pytest.mark.slow
def test_parameter_counts_and_update_ranks(demo_run):
    _, m = demo_run
    r = m["rank"]
    layers = [(64, 1000), (1000, 2000), (2000, 10)]
    assert m["params_lora"] == sum(r * (n_in + n_out) for n_in, n_out in layers)
    assert m["params_original"] == sum(n_in * n_out + n_out for n_in, n_out in layers)
    assert len(m["delta_ranks"]) == 3 and all(1 <= k <= r for k in m["delta_ranks"])


@pytest.mark.slow
def test_merged_outputs_equal_unmerged_and_adapter_is_small(demo_run):
    out, m = demo_run
    assert m["merged_max_abs_diff"] < 1e-5
    assert m["adapter_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    assert m["adapter_bytes"] < m["base_model_bytes"] / 100


@pytest.mark.slow
def test_report_references_only_images_that_exist(demo_run):
    out, _ = demo_run
    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) >= 3
    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_gives_the_same_numbers(demo_run, tmp_path):
    _, first = demo_run
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "0"]) == 0
    second = json.loads((tmp_path / "metrics.json").read_text())
    for m in (first, second):
        m.pop("seconds")
    assert first == second


def test_low_rank_view_with_a_rank_past_the_smallest_layer_keeps_all_energy():
    model = lk.inject(oversized_mlp(), lk.LoraConfig(r=12, target_modules=list(LAYERS)))  # linear3 is 10 × 2000
    rows, _ = low_rank_view(model, 12)
    assert [row["energy_top_12"] for row in rows][-1] == 1.0


@pytest.mark.slow
def test_the_report_loads_cleanly_in_a_browser_at_1280_px(demo_run):
    out, _ = demo_run
    check = check_page(out / "report.html")  # tests/browser.py: images, console errors, width
    assert check.problems() == []
    assert check.images >= 3
