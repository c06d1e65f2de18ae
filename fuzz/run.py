"""The long fuzzing run: the property of tests/test_fuzz.py with many more examples per format.

    python fuzz/run.py [--examples 100000] [--formats safetensors zip legacy tar pt2 onnx onnx-external]

Prints the number of examples run per format; stops (saving the falsifying input) on the first failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import check_one, mutations, seed_files, target_name


def run_format(fmt: str, seed: bytes, work: Path, examples: int) -> int:
    """Run the property ``examples`` times on mutations of ``seed``; return how many inputs were checked."""
    target = work / target_name(fmt)
    count = 0

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutations(fmt, seed))
    def property_holds(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            check_one(target, data)
        except BaseException:
            (work / f"failing-{fmt}.bin").write_bytes(data)
            raise

    property_holds()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument(
        "--formats", nargs="+", default=["safetensors", "zip", "legacy", "tar", "pt2", "onnx", "onnx-external"]
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bncheck-fuzz-"))
    seeds = seed_files(work)
    for fmt in args.formats:
        start = time.perf_counter()
        count = run_format(fmt, seeds[fmt], work, args.examples)
        sys.stdout.write(f"{fmt}: {count} examples, no failure, {time.perf_counter() - start:.0f} s\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
