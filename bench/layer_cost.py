"""Inspection cost per BatchNorm layer, from 40 to 4,000 layers, measured in one run.

    python bench/layer_cost.py [--repeats 5]

Generates once (cached beside the other benchmark checkpoints, see checkpoints.py) state dicts of 40, 400 and
4,000 BatchNorm layers of 64 channels (weight, bias, running_mean, running_var, num_batches_tracked), as .pt and
.safetensors. Then prints, for each:

  in-process     the median time of ``bncheck.inspect(path)`` after imports and one warm-up call (process start
                 and imports excluded), and that time per layer
  whole process  the median time and peak RSS of ``bncheck inspect --json FILE``
  diff           the median time of ``diff_checkpoints(a.pt, a.safetensors)`` in process, against inspecting one

and how the per-layer cost grows from 40 to 4,000 layers. The targets (issue 18): at most 0.05 ms per layer in
process at 4,000 layers, peak RSS under 100 MiB, and diff of two 4,000-layer files within 2x the time of inspecting
one. Everything else is information.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import many_layer_checkpoints
from inspect_speed import run

import bncheck
from bncheck.diff import diff_checkpoints

LAYER_COUNTS = (40, 400, 4000)
FORMATS = ("pt", "safetensors")


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: the page cache, lazily imported modules
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    files = {layers: many_layer_checkpoints(layers) for layers in LAYER_COUNTS}
    print(f"{'layers':>6} {'format':<12} {'in-process s':>12} {'ms/layer':>9} {'process s':>10} {'peak RSS MiB':>13}")
    per_layer: dict[tuple[int, str], float] = {}
    inspected: dict[tuple[int, str], float] = {}
    for layers, paths in files.items():
        for name in FORMATS:
            path = paths[name]
            seconds = median_seconds(lambda p=path: bncheck.inspect(p), repeats)  # type: ignore[misc]
            inspected[layers, name] = seconds
            per_layer[layers, name] = seconds / layers * 1000
            samples = [run([sys.executable, "-m", "bncheck", "inspect", "--json", str(path)]) for _ in range(repeats)]
            process = statistics.median(s.seconds for s in samples)
            rss = max(s.peak_rss_mib for s in samples)
            print(
                f"{layers:>6} {name:<12} {seconds:>12.4f} {per_layer[layers, name]:>9.4f} {process:>10.3f} {rss:>13.0f}"
            )
    low, high = LAYER_COUNTS[0], LAYER_COUNTS[-1]
    for name in FORMATS:
        growth = per_layer[high, name] / per_layer[low, name]
        print(f"per-layer cost {name}: {per_layer[high, name]:.4f} ms at {high} layers, {growth:.2f}x that at {low}")
    for layers, paths in files.items():
        seconds = median_seconds(lambda p=paths: diff_checkpoints(p["pt"], p["safetensors"]), repeats)  # type: ignore[misc]
        ratio = seconds / max(inspected[layers, "pt"], inspected[layers, "safetensors"])
        print(f"diff .pt .safetensors at {layers} layers: {seconds:.4f} s, {ratio:.2f}x inspecting one")


if __name__ == "__main__":
    main()
