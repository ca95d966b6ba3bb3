"""The browser check of the report pages (tests/browser.py) can fail: a page with a missing image, a console error,
an uncaught exception and a 2000 px wide element is caught on each count, while a clean page with a real image
and a wide table that scrolls in its own box passes. Without a browser the tests skip and say how to get one."""

import numpy as np
import pytest
from browser import CHROMIUM_ENV, check_page, chromium_or_skip
from matplotlib.image import imsave

HEAD = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>t</title>'
WIDE_TABLE = "<table><tr>" + "<td>0.123456789</td>" * 200 + "</tr></table>"  # far more than 1280 px


@pytest.fixture
def picture(tmp_path):
    imsave(tmp_path / "ok.png", np.linspace(0, 1, 64).reshape(8, 8), cmap="gray")
    return "ok.png"


def test_a_broken_page_is_caught_on_every_count(tmp_path, picture):
    page = tmp_path / "broken.html"
    page.write_text(
        HEAD + "</head><body>"
        f'<p><img src="{picture}" alt="fine"> <img src="missing.png" alt="gone"></p>'
        '<div id="banner" style="width: 2000px">too wide</div>'
        "<script>console.error('boom'); undefined_function();</script>"
        "</body></html>"
    )
    check = check_page(page)
    assert check.images == 2 and check.broken_images == ["missing.png"]
    assert "boom" in check.console_errors
    assert any("undefined_function" in e for e in check.console_errors)
    assert check.page_width >= 2000 > check.viewport_width
    assert ("div#banner", 8, 2008) in check.overflowing  # body's default margin is 8 px
    assert len(check.problems()) == 3


def test_a_clean_page_passes_and_a_table_that_scrolls_in_its_box_is_not_overflow(tmp_path, picture):
    page = tmp_path / "clean.html"
    page.write_text(
        HEAD + "<style>.scroll { max-width: 100%; overflow-x: auto; }</style></head><body>"
        f'<p><img src="{picture}" alt="fine" style="max-width: 100%"></p>'
        f'<div class="scroll">{WIDE_TABLE}</div>'
        "<script>console.log('not an error')</script>"
        "</body></html>"
    )
    check = check_page(page)
    assert check.problems() == []
    assert check.images == 1 and check.page_width <= check.viewport_width


def test_without_a_browser_the_skip_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "no-such-chromium"))
    with pytest.raises(pytest.skip.Exception) as skipped:
        chromium_or_skip()
    assert "apt-get install -y chromium" in str(skipped.value) and CHROMIUM_ENV in str(skipped.value)
