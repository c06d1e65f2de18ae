"""The HTML report of the 400-layer bench checkpoint: its size, its time and its memory, beside the JSON report.

    python bench/html_report.py [--repeats 3]

Uses the large safetensors checkpoint of bench/checkpoints.py (400 BatchNorm1d layers of 1024 random channels between
1024x1024 linear layers, 1.7 GB, generated once and cached). Runs `bncheck inspect FILE --format html` and
`--format json` as whole processes, alternating, and prints the median wall time and the peak RSS of each (measured as
bench/inspect_speed.py measures them), the size of the page, in this process the time spent rendering alone, and
when Chromium is installed the time headless Chromium takes to load and lay out the page (`--dump-dom`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import big_checkpoints
from inspect_speed import installed_bncheck, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bncheck = installed_bncheck(parser)
    path = big_checkpoints(formats=("safetensors",))["safetensors"]
    page = subprocess.run([bncheck, "inspect", str(path), "--format", "html"], capture_output=True, check=True).stdout
    commands = {fmt: [bncheck, "inspect", str(path), "--format", fmt] for fmt in ("html", "json")}
    results = measure(commands, args.repeats)

    import bncheck as library
    from bncheck.config import Options
    from bncheck.render.html import render_html

    report = library.inspect(path, options=Options(channel_values=True))
    layers = report.layer_count
    render = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        render_html(report)
        render.append(time.perf_counter() - start)
    rendering = statistics.median(render)

    print(f"{path.name}: {layers} BatchNorm layers, median of {args.repeats} alternating runs")
    for fmt, sample in results.items():
        print(f"  --format {fmt:<5} {sample.seconds:7.2f} s  peak RSS {sample.peak_rss_mib:5.0f} MiB")
    print(f"  page: {len(page) / 2**20:.1f} MiB, {len(page) / layers / 1024:.1f} KiB a layer")
    print(f"  rendering alone: {rendering:.2f} s, {rendering / layers * 1000:.1f} ms a layer")
    browser = shutil.which("chromium")
    if browser is not None:
        with tempfile.TemporaryDirectory() as scratch:
            saved, empty = Path(scratch) / "report.html", Path(scratch) / "empty.html"
            saved.write_bytes(page)
            empty.write_text("<!DOCTYPE html><title>empty</title>")
            command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={scratch}/p"]
            loads: dict[Path, list[float]] = {saved: [], empty: []}
            for _ in range(args.repeats):
                for target, times in loads.items():
                    start = time.perf_counter()
                    subprocess.run([*command, "--dump-dom", target.as_uri()], capture_output=True, check=True)
                    times.append(time.perf_counter() - start)
        print(
            f"  chromium --dump-dom: {statistics.median(loads[saved]):.1f} s "
            f"(an empty page: {statistics.median(loads[empty]):.1f} s)"
        )


if __name__ == "__main__":
    main()
