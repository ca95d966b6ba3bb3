"""The demo's report.html in a real headless browser (tests/browser.py): every image loads, no console error, and
nothing is wider than a 1280 px viewport."""

import pytest
from browser import check_page

# One worker for every test of `demo_run` under `--dist loadgroup`, so that the session runs the demo once.
pytestmark = pytest.mark.xdist_group("demo_run")


@pytest.mark.slow
def test_demo_report_loads_cleanly_at_1280_px(demo_run):
    out, _ = demo_run
    check = check_page(out / "report.html")
    assert check.problems() == []
    assert check.images >= 3
