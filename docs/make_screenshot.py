"""Make docs/html-report.png, the README's screenshot of the HTML report, with the test suite's own rendering.

    python docs/make_screenshot.py

tests/browser.py writes the report (``README_REPORT``, through the CLI) and opens it in headless Chromium offline,
exactly as tests/test_html_browser.py does; the screenshot is then reduced to a 64-colour palette to stay small.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import README_REPORT, README_WINDOW, ROOT, open_page, write_report

OUTPUT = ROOT / "docs" / "html-report.png"


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        page, shot = Path(scratch) / "report.html", Path(scratch) / "report.png"
        write_report(README_REPORT, page)
        run = open_page(page, shot, width=README_WINDOW[0], height=README_WINDOW[1])
        if run.failed_loads:
            raise SystemExit(f"the page tried to load: {run.failed_loads}")
        with Image.open(shot) as image:
            image.convert("RGB").quantize(colors=64).save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({OUTPUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
