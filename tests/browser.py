"""Write an HTML report and open it in headless Chromium with the network cut off, as the HTML report's tests and
docs/make_screenshot.py do: a screenshot, the DOM after rendering, the page's console messages and the network
requests it made.

Chromium runs twice on the same ``file://`` URL with a throwaway profile: once for the screenshot (with its console
on stderr and a NetLog of every request), once to print the DOM. Its proxy is a closed port and every host name
resolves to nothing, so a load that slipped past the page's Content-Security-Policy would fail, and would still be
recorded. Chromium's own background requests (updates, accounts) are told apart by their network isolation key:
a request the page makes carries the page's origin, ``file://``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bncheck.cli import run

ROOT = Path(__file__).resolve().parent.parent
# the report the README shows: one file, a picture per layer, two channels highlighted and marked +inf
README_REPORT = ("inspect", "fixtures/bad/BN001-fp16-overflow.safetensors")
README_WINDOW = (1000, 1080)

TIMEOUT = 120
OFFLINE = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--hide-scrollbars",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
)


def write_report(args: Sequence[str], page: Path) -> int:
    """Run ``bncheck ARGS --format html`` in this process from the repository's root (the paths the page shows are
    the ones given), write its output to ``page`` and return the exit code."""
    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = run([*args, "--format", "html"])
    page.write_text(out.getvalue(), encoding="utf-8")
    return code


def chromium() -> str | None:
    """The Chromium executable (Debian's package installs ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass(frozen=True)
class BrowserRun:
    dom: str
    # what the page logged to its console: a load refused by the Content-Security-Policy, a failed load
    console: tuple[str, ...]
    # URLs the page itself asked the network for
    requests: tuple[str, ...]

    @property
    def failed_loads(self) -> tuple[str, ...]:
        """Every sign of a resource the page tried to load: refused, failed, or sent to the network."""
        refused = tuple(
            line
            for line in self.console
            if "Content Security Policy" in line or "Failed to load resource" in line or "net::ERR_" in line
        )
        return refused + self.requests


def open_page(page: Path, screenshot: Path, *, width: int = 1100, height: int = 1400) -> BrowserRun:
    """Render ``page`` offline, save a ``width`` x ``height`` screenshot of its top, and return what happened."""
    executable = chromium()
    if executable is None:
        raise FileNotFoundError("chromium is not installed")
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as scratch:
        net_log = Path(scratch) / "netlog.json"
        common = [executable, *OFFLINE, f"--user-data-dir={scratch}/profile"]
        shot = subprocess.run(
            [
                *common,
                "--enable-logging=stderr",
                "--v=0",
                f"--log-net-log={net_log}",
                f"--window-size={width},{height}",
                f"--screenshot={screenshot}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            env={**os.environ, "LANG": "C.UTF-8"},
        )
        if shot.returncode != 0 or not screenshot.exists():
            raise RuntimeError(f"chromium failed ({shot.returncode}): {shot.stderr[-2000:]}")
        dom = subprocess.run(
            [*common, "--dump-dom", url], capture_output=True, text=True, timeout=TIMEOUT, check=True
        ).stdout
        console = tuple(line for line in shot.stderr.splitlines() if ":CONSOLE" in line)
        return BrowserRun(dom=dom, console=console, requests=_page_requests(net_log))


def _page_requests(net_log: Path) -> tuple[str, ...]:
    """The URLs of the requests a ``file://`` page started, from a Chromium NetLog."""
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return tuple(
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start
        and "url" in event.get("params", {})
        and str(event["params"].get("network_isolation_key", "")).startswith("file://")
    )
