"""Inspect the benchmark checkpoint over HTTP with and without prefetching, against a loopback server that waits
before answering each request, as an object store does.

    python bench/remote_speed.py [--latency 0.01]

Uses the checkpoints of bench/inspect_speed.py (generated on first use) and tests/range_server.py. For the .pt and
the .safetensors it prints the wall time, the number of requests and the bytes served of `bncheck inspect URL`,
then the same with prefetching switched off (every tensor read on its own, one round trip after another).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import big_checkpoints
from range_server import RangeServer

from bncheck.cli import run
from bncheck.loaders.files import RemoteSource


def inspect_url(folder: Path, name: str, latency: float) -> tuple[float, int, int]:
    with RangeServer(folder, latency=latency) as server:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = run(["inspect", "--json", f"{server.url}/{name}"])
        seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"bncheck inspect {name} exited {code}")
        return seconds, server.requests, server.bytes_served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.01, help="seconds before each GET is answered")
    args = parser.parse_args()
    big = big_checkpoints(formats=("pt", "safetensors"))
    print(f"loopback HTTP server answering each request after {args.latency * 1000:.0f} ms")
    print(f"  {'file':<16} {'mode':<14} {'seconds':>8} {'requests':>9} {'MiB served':>11}")
    for path in big.values():
        prefetching = RemoteSource.prefetch
        results = {"prefetch": inspect_url(path.parent, path.name, args.latency)}
        RemoteSource.prefetch = lambda self, ranges: None
        try:
            results["tensor by tensor"] = inspect_url(path.parent, path.name, args.latency)
        finally:
            RemoteSource.prefetch = prefetching
        for mode, (seconds, requests, served) in results.items():
            print(f"  {path.name:<16} {mode:<14} {seconds:>8.2f} {requests:>9} {served / 2**20:>11.1f}")
        ratio = results["tensor by tensor"][0] / results["prefetch"][0]
        print(f"  {path.name}: prefetching is {ratio:.0f}x faster")


if __name__ == "__main__":
    main()
