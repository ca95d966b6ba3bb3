"""`lorakit study --quick` on the digit classifier, end to end (slow): study.json holds every number, the plots and
a self-contained report.html are written (and load cleanly in a real headless browser, tests/browser.py), and a
resumed study trains only what it had not finished."""

import json
import re
from pathlib import Path

import pytest
from browser import check_page

from lorakit.cli import main

PLOTS = ("parameters.png", "similarity.png", "amplification.png", "truncation.png")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    assert main(["study", "--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_study_json_holds_every_number(quick_study):
    results = json.loads((quick_study / "study.json").read_text())
    assert results["task"]["trained_parameters"] == 2_087_010 and results["task"]["tensors"] == 6
    assert 0 <= results["base_metric"] < results["full"]["metric"] <= 1
    assert [p["r"] for p in results["lora"]] == [1, 8, 64]
    assert results["lora_second_seed"]["r"] == 8 and results["lora_second_seed"]["seed"] == 1
    for point in results["lora"]:
        assert len(point["amplification"]) == 3  # linear1..3
    for method in ("did", "said"):
        result = results["intrinsic"][method]
        assert result["points"][0]["d"] == 0
        assert result["threshold"] == pytest.approx(0.9 * results["full"]["metric"])
    assert results["intrinsic"]["said"]["tensors"] == 6
    first = results["similarity"]["r8_r64"][0]
    assert first["layer"] == "linear1" and len(first["phi"]) == 8 and len(first["phi"][0]) == 64
    assert len(results["similarity"]["r8_seeds"][0]["phi"][0]) == 8
    truncation = results["full"]["truncation"]
    assert truncation["layers"] == ["linear1", "linear2", "linear3"]
    assert truncation["fraction"][-1]["metric"] == pytest.approx(results["full"]["metric"])  # full rank: W itself


@pytest.mark.slow
def test_plots_are_pngs_and_the_report_is_self_contained(quick_study):
    for name in PLOTS:
        assert (quick_study / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (quick_study / "report.html").read_text()
    images = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)
    assert sorted(images) == sorted(PLOTS)  # relative, beside the page
    assert all((quick_study / image).is_file() for image in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page
    for heading in ("Intrinsic dimension", "LoRA's rank", "same directions", "Amplification", "Truncating"):
        assert heading in page


@pytest.mark.slow
def test_a_resumed_study_trains_only_the_missing_points(quick_study, capsys):
    points = quick_study / "points"
    kept = {path.name: path.stat().st_mtime_ns for path in points.iterdir() if path.name != "lora-r1-seed0.json"}
    (points / "lora-r1-seed0.json").unlink()
    before = json.loads((quick_study / "study.json").read_text())
    capsys.readouterr()
    assert main(["study", "--quick", "--out", str(quick_study)]) == 0
    log = capsys.readouterr()
    trained = re.findall(r"^(.*?) · loss", log.out + log.err, flags=re.MULTILINE)
    assert set(trained) == {"LoRA r=1"}, set(trained)  # only the deleted point, nothing else retrained
    assert {path.name: path.stat().st_mtime_ns for path in points.iterdir() if path.name in kept} == kept
    after = json.loads((quick_study / "study.json").read_text())
    assert after["intrinsic"] == before["intrinsic"] and after["full"] == before["full"]
    assert after["lora"][0]["metric"] == pytest.approx(before["lora"][0]["metric"])  # the same run, retrained


@pytest.mark.slow
def test_a_study_with_other_settings_is_refused_in_the_same_out(quick_study, capsys):
    assert main(["study", "--quick", "--steps", "7", "--out", str(quick_study)]) == 2
    assert "holds a study with other settings (steps 60 → 7)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_loads_cleanly_in_a_browser_at_1280_px(quick_study):
    check = check_page(quick_study / "report.html")
    assert check.problems() == []
    assert check.images >= len(PLOTS)
