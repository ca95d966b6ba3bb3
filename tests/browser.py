"""A report page opened in a real headless browser (`from browser import check_page`): Debian's chromium, driven by
Playwright through `executable_path` (Playwright's own browsers are never downloaded).

`check_page` loads a page file at a 1280 px wide viewport and returns what a reader would see go wrong: images
that did not load, console errors (uncaught exceptions included) and elements that stick out past the viewport's
right or left edge. `chromium_or_skip` finds the browser, or skips the test with a reason that says how to get one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["CHROMIUM_ENV", "PageCheck", "check_page", "chromium_or_skip", "find_chromium"]

CHROMIUM_ENV = "LORAKIT_CHROMIUM"  # a chromium binary elsewhere than /usr/bin/chromium or PATH
HOW_TO_GET = (
    f"no chromium found: install Debian's package (`apt-get install -y chromium`, which `.ci/run` does as root) "
    f"or set {CHROMIUM_ENV} to a chromium binary"
)
# Root needs --no-sandbox; the rest keep chromium from reaching for the network (updates, sync, QUIC probes)
# and the GPU, none of which a report page needs.
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-quic",
]

# Elements whose border box passes the viewport's edges, unless an ancestor clips or scrolls them (a wide table
# in an overflow-x: auto box scrolls inside the page, the page itself does not): "tag#id.class", left, right.
OVERFLOW_SCRIPT = """
() => {
  const width = document.documentElement.clientWidth;
  const clipped = (element) => {
    for (let up = element.parentElement; up && up !== document.body && up !== document.documentElement;
         up = up.parentElement) {
      if (getComputedStyle(up).overflowX !== "visible") return true;
    }
    return false;
  };
  const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "")
    + (typeof e.className === "string" && e.className ? "." + e.className.trim().split(/\\s+/).join(".") : "");
  const out = [];
  for (const element of document.body.querySelectorAll("*")) {
    const box = element.getBoundingClientRect();
    if (box.width === 0 || (box.right <= width + 0.5 && box.left >= -0.5) || clipped(element)) continue;
    out.push([name(element), Math.round(box.left), Math.round(box.right)]);
  }
  return {width: width, scrollWidth: document.documentElement.scrollWidth, elements: out};
}
"""

# Every <img> that did not load: not complete, or complete with no pixels (a missing or undecodable file).
BROKEN_IMAGES_SCRIPT = """
() => Array.from(document.images).filter((i) => !i.complete || i.naturalWidth === 0)
  .map((i) => i.getAttribute("src"))
"""


@dataclass
class PageCheck:
    """What went wrong on a page: each list empty on a good one.

    Attributes:
        images: how many <img> the page has.
        broken_images: the src of each image that did not load.
        console_errors: the text of each console error and uncaught exception.
        viewport_width: the layout viewport's width in CSS px (1280 less any scrollbar).
        page_width: the document's scroll width: more than viewport_width when the page scrolls sideways.
        overflowing: (element, left, right) for each element that passes the viewport's edges, in CSS px.
    """

    images: int
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    viewport_width: int = 0
    page_width: int = 0
    overflowing: list[tuple[str, int, int]] = field(default_factory=list)

    def problems(self) -> list[str]:
        """One line per kind of fault found; an empty list for a page that passes."""
        found = []
        if self.broken_images:
            found.append(f"images that did not load: {self.broken_images}")
        if self.console_errors:
            found.append(f"console errors: {self.console_errors}")
        if self.page_width > self.viewport_width or self.overflowing:
            found.append(
                f"wider than the {self.viewport_width} px viewport (page {self.page_width} px): {self.overflowing[:5]}"
            )
        return found


def find_chromium() -> str | None:
    """The chromium to drive: $LORAKIT_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH; None if none."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def chromium_or_skip() -> str:
    """The chromium binary, after checking that Playwright is installed.

    Raises:
        pytest.skip.Exception: when Playwright or chromium is missing, with a reason that says how to get it.
    """
    pytest.importorskip("playwright", reason="Playwright is missing: pip install -e '.[dev]'")
    path = find_chromium()
    if path is None:
        pytest.skip(HOW_TO_GET)
    return path


def check_page(page_file: str | os.PathLike, width: int = 1280, height: int = 800) -> PageCheck:
    """Opens `page_file` in headless chromium at a `width` × `height` viewport and reports what went wrong.

    Args:
        page_file: an HTML file; the images it names are read from beside it (file:// URLs).
        width, height: the viewport, in CSS px.

    Returns:
        A PageCheck; `check.problems()` is empty when every image loaded, nothing was logged as an error and no
        element passes the viewport's edges.

    Raises:
        pytest.skip.Exception: when no browser is found (see `chromium_or_skip`).
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    errors: list[str] = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="lorakit-chromium-") as profile:
        # a fresh profile each time: nothing cached from another page or run
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=ARGS, viewport={"width": width, "height": height}
        )
        try:
            page = context.new_page()
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.goto(Path(page_file).resolve().as_uri(), wait_until="load")  # "load" waits for the images
            images = page.evaluate("() => document.images.length")
            broken = page.evaluate(BROKEN_IMAGES_SCRIPT)
            layout = page.evaluate(OVERFLOW_SCRIPT)
        finally:
            context.close()
    return PageCheck(
        images=images,
        broken_images=broken,
        console_errors=errors,
        viewport_width=layout["width"],
        page_width=layout["scrollWidth"],
        overflowing=[tuple(e) for e in layout["elements"]],
    )
