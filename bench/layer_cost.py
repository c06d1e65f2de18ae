"""Inspection cost per BatchNorm layer, from 40 to 4,000 layers, measured in one run.

    python bench/layer_cost.py [--repeats 5]

Generates once (cached beside the other benchmark checkpoints, see checkpoints.py) state dicts of 40, 400 and
4,000 BatchNorm layers of 64 channels (weight, bias, running_mean, running_var, num_batches_tracked), as .pt and
.safetensors. Then prints, for each:

  in-process     the median time of ``bncheck.inspect(path)`` in a fresh interpreter, after its imports and one
                 warm-up call (process start and imports excluded), and that time per layer
  whole process  the median time and peak RSS of ``bncheck inspect --json FILE``
  diff           the median time of ``diff_checkpoints(a.pt, a.safetensors)`` in process, against inspecting the
                 slower of the two

and how the per-layer cost grows from 40 to 4,000 layers. The targets (issue 18): at most 0.05 ms per layer in
process at 4,000 layers, peak RSS under 100 MiB, and diff of two 4,000-layer files within 2x the time of inspecting
one. Everything else is information.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import many_layer_checkpoints
from inspect_speed import run

LAYER_COUNTS = (40, 400, 4000)
FORMATS = ("pt", "safetensors")

# Timed in a fresh interpreter that has imported bncheck and nothing else: this benchmark's own process holds torch,
# whose heap would make every garbage collection in the timed calls slower than in bncheck's real process.
IN_PROCESS = """
import json, statistics, sys, time
import bncheck
from bncheck.diff import diff_checkpoints
repeats, paths = int(sys.argv[1]), sys.argv[2:]
def median(call):
    call()  # warm-up: the page cache, lazily imported modules
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)
inspected = [median(lambda p=p: bncheck.inspect(p)) for p in paths]
diffed = median(lambda: diff_checkpoints(*paths)) if len(paths) == 2 else None
print(json.dumps([inspected, diffed]))
"""


Timing = tuple[float, float]  # median wall-clock and CPU seconds


def in_process(paths: list[Path], repeats: int) -> tuple[list[Timing], Timing | None]:
    """The median seconds of inspect() on each path, and of diff_checkpoints() of the two, after imports."""
    command = [sys.executable, "-c", IN_PROCESS, str(repeats), *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    inspected, diffed = json.loads(result.stdout)
    return [tuple(t) for t in inspected], None if diffed is None else tuple(diffed)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    files = {layers: many_layer_checkpoints(layers) for layers in LAYER_COUNTS}
    print(
        f"{'layers':>6} {'format':<12} {'in-process s':>12} {'ms/layer':>9} {'CPU ms/layer':>12} {'process s':>10} "
        f"{'peak RSS MiB':>13}"
    )
    per_layer: dict[tuple[int, str], Timing] = {}
    diffs: dict[int, tuple[Timing, float, float]] = {}
    for layers, paths in files.items():
        inspected, diffed = in_process([paths[name] for name in FORMATS], repeats)
        assert diffed is not None
        diffs[layers] = (
            diffed,
            diffed[0] / max(wall for wall, _ in inspected),
            diffed[1] / max(cpu for _, cpu in inspected),
        )
        for name, (seconds, cpu) in zip(FORMATS, inspected, strict=True):
            per_layer[layers, name] = (seconds / layers * 1000, cpu / layers * 1000)
            samples = [
                run([sys.executable, "-m", "bncheck", "inspect", "--json", str(paths[name])]) for _ in range(repeats)
            ]
            process = statistics.median(s.seconds for s in samples)
            rss = max(s.peak_rss_mib for s in samples)
            wall_ms, cpu_ms = per_layer[layers, name]
            print(
                f"{layers:>6} {name:<12} {seconds:>12.4f} {wall_ms:>9.4f} {cpu_ms:>12.4f} {process:>10.3f} {rss:>13.0f}"
            )
    low, high = LAYER_COUNTS[0], LAYER_COUNTS[-1]
    for name in FORMATS:
        (wall_high, cpu_high), (wall_low, cpu_low) = per_layer[high, name], per_layer[low, name]
        print(
            f"per-layer cost {name} at {high} layers: {wall_high:.4f} ms ({wall_high / wall_low:.2f}x that at {low}), "
            f"CPU {cpu_high:.4f} ms ({cpu_high / cpu_low:.2f}x)"
        )
    for layers, ((seconds, _), ratio, cpu_ratio) in diffs.items():
        print(
            f"diff .pt .safetensors at {layers} layers: {seconds:.4f} s in process, {ratio:.2f}x inspecting either "
            f"(CPU {cpu_ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
