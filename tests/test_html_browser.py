"""The HTML report in a real browser: headless Chromium opens it from a file:// URL with the network cut off, takes
a screenshot, and the DOM it rendered has a picture (an SVG) per layer while the page tried to load nothing.

Skipped when Chromium is not installed, unless BNCHECK_REQUIRE_BROWSER is set: .ci/run installs Chromium and sets
it, so that in CI a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import README_REPORT, README_WINDOW, chromium, open_page, write_report
from conftest import BAD, FIXTURES, GOOD

if chromium() is None and not os.environ.get("BNCHECK_REQUIRE_BROWSER"):
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)", allow_module_level=True)

RECOMPUTE = FIXTURES / "recompute"
CASES = {
    "single file": list(README_REPORT),
    "directory": ["inspect", str(BAD)],
    "recomputation": [
        "inspect",
        str(RECOMPUTE / "stale-untracked-finetune.safetensors"),
        "--model",
        f"{RECOMPUTE / 'models.py'}:tabular_mlp",
        "--data",
        str(RECOMPUTE / "sample-shifted.npy"),
    ],
    "diff": ["diff", str(GOOD / "mlp-state-dict.pt"), str(BAD / "BN002-negative-var.safetensors")],
}


class Rendered(HTMLParser):
    """From the DOM Chromium rendered: each layer figure and the SVG elements drawn in it."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.figures: list[dict[str, int]] = []
        self._open = False
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "figure":
            self._open = dict(attrs).get("class") == "layer"
            if self._open:
                self.figures.append({"svg": 0, "path": 0})
        elif self._open and tag in ("svg", "path"):
            self.figures[-1][tag] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._open = False


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def expected_pictures(cli, args: list[str]) -> int:
    """A picture per layer (inspect), or per layer beyond the thresholds (diff), as the JSON report counts them."""
    document = cli(*args, "--json").json()
    if args[0] == "diff":
        return sum(1 for row in document["layers"] if row["drifted"])
    return sum(len(file["layers"]) for file in document["files"])


@pytest.mark.parametrize("case", list(CASES))
def test_the_report_renders_offline_with_a_picture_per_layer(case: str, cli, tmp_path: Path) -> None:
    args = CASES[case]
    page, screenshot = tmp_path / "report.html", tmp_path / "report.png"
    assert write_report(args, page) == 1  # every case has findings or drift
    run = open_page(page, screenshot, width=1100, height=1400)
    assert run.failed_loads == ()
    assert png_size(screenshot) == (1100, 1400) and screenshot.stat().st_size > 20_000  # drawn, not blank
    figures = Rendered(run.dom).figures
    assert len(figures) == expected_pictures(cli, args) > 0
    # each an SVG with its two panels drawn (a layer without values still gets its axes and says so)
    assert all(figure["svg"] == 1 and figure["path"] >= 10 for figure in figures), figures


def test_the_readme_screenshot_is_the_readme_report(tmp_path: Path) -> None:
    """docs/make_screenshot.py renders README_REPORT this way; the picture it committed has the window's size."""
    assert png_size(Path(__file__).resolve().parent.parent / "docs" / "html-report.png") == README_WINDOW


def test_a_load_is_caught_whether_or_not_the_policy_blocks_it(tmp_path: Path) -> None:
    """The checks above would see a slip: a load the page's policy refuses is in its console, and one a page without
    the policy sends is in the network log."""
    body = '<link rel="stylesheet" href="https://cdn.example.com/x.css"><img src="http://example.com/a.png">'
    policy = '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
    for name, head in (("blocked", policy), ("sent", "")):
        page = tmp_path / f"{name}.html"
        page.write_text(f"<!DOCTYPE html><html><head>{head}</head><body>{body}</body></html>")
        run = open_page(page, tmp_path / f"{name}.png", width=400, height=300)
        found = " ".join(run.failed_loads)
        assert "cdn.example.com/x.css" in found and "example.com/a.png" in found, (name, run)
        if name == "sent":
            assert set(run.requests) == {"https://cdn.example.com/x.css", "http://example.com/a.png"}
