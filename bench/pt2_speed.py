"""Inspecting a torch.export archive (.pt2) against torch.export.load, measured as whole processes, side by side.

    python bench/pt2_speed.py [--repeats 5]

Exports once (cached in $BNCHECK_BENCH_CACHE, default ~/.cache/bncheck-bench) the model of
``checkpoints.deep_bn_model``: 400 BatchNorm2d layers between 3x3 convolutions of 256 channels, 944 MB of
convolution weights, with torch.export.export and torch.export.save. Then times, alternating, the median wall time
and peak RSS of:

  bncheck            bncheck inspect --json FILE
  torch.export.load  a script: torch.export.load, then the statistics checked with torch
  floor              a script that reads the BatchNorm tensors' bytes and nothing else

prints the ratios to bncheck, and, from one more run of bncheck with its reads counted in process, how many bytes
of the file it read: the program, the configurations, the sample inputs and the BatchNorm tensors, never the
convolution weights.

The target: the whole bncheck process at least 5x faster than the torch.export.load script. Peak RSS is printed as
information.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import exported_checkpoint
from inspect_speed import CHECK, FLOOR, begin_bench, info, measure, run, table, verdict

EXPORT_LOAD = (
    "import sys, torch\n"
    + CHECK
    + """
program = torch.export.load(sys.argv[1])
check(program.state_dict.items())
"""
)

# Runs `bncheck ARGS...` in process with every read of a local checkpoint counted (LocalSource's ranged reads and the
# file objects zipfile reads the directory through), and prints the total on stderr.
COUNT_READS = """
import sys
from bncheck.loaders.files import LocalSource

total = 0
read, open_file = LocalSource._read, LocalSource.open

class Counted:
    def __init__(self, handle):
        self.handle = handle
    def read(self, size=-1):
        global total
        data = self.handle.read(size)
        total += len(data)
        return data
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()

def counted_read(self, offset, length):
    global total
    data = read(self, offset, length)
    total += len(data)
    return data

LocalSource._read = counted_read
LocalSource.open = lambda self: Counted(open_file(self))
from bncheck.cli import run
code = run(sys.argv[1:])
print(total, file=sys.stderr)
"""


def bn_byte_ranges(path: Path, scratch: Path) -> Path:
    """The absolute (offset, length) of every BatchNorm tensor's bytes, from bncheck's own reader (for the floor)."""
    import zipfile

    from bncheck.discover import find_bn_layers
    from bncheck.loaders import open_checkpoint
    from bncheck.loaders.dtypes import ITEMSIZE
    from bncheck.loaders.files import LocalSource
    from bncheck.loaders.torch_zip import member_data_start

    source = LocalSource(path)
    with zipfile.ZipFile(path) as archive:
        starts = {info.filename: member_data_start(source, info) for info in archive.infolist()}
    ranges = []
    for layer in find_bn_layers(open_checkpoint(path).root):
        for ref in layer.tensors.values():
            location = ref.location
            assert location is not None and location.member is not None
            ranges.append((starts[location.member] + location.offset, ref.numel * ITEMSIZE[ref.dtype]))
    target = scratch / "pt2.ranges.json"
    target.write_text(json.dumps(ranges))
    return target


def main() -> None:
    repeats, bncheck = begin_bench(__doc__ or "")
    py = sys.executable
    path = exported_checkpoint()
    scratch = Path(tempfile.mkdtemp())
    commands = {
        "bncheck": [bncheck, "inspect", "--json", str(path)],
        "torch.export.load": [py, "-c", EXPORT_LOAD, str(path)],
        "floor": [py, "-c", FLOOR, str(path), str(bn_byte_ranges(path, scratch))],
    }
    run(commands["bncheck"])  # warm the page cache and imports
    run(commands["torch.export.load"])
    results = measure(commands, repeats)
    size = path.stat().st_size
    table(f"pt2: {path.name} ({size / 2**30:.2f} GiB, 400 BatchNorm2d layers)", results)

    counted = subprocess.run(
        [py, "-c", COUNT_READS, "inspect", "--json", str(path)], capture_output=True, text=True, check=False
    )
    read_bytes = int(counted.stderr.strip().splitlines()[-1])
    ranges = json.loads((scratch / "pt2.ranges.json").read_text())
    bn_bytes = sum(length for _, length in ranges)

    print("\nTarget (whole processes)")
    ratio = results["torch.export.load"].seconds / results["bncheck"].seconds
    verdict(f"bncheck {ratio:.1f}x faster than the torch.export.load script (target >= 5x)", ratio >= 5)
    print("\nFor information (no target)")
    peak, theirs = results["bncheck"].peak_rss_mib, results["torch.export.load"].peak_rss_mib
    info(f"peak RSS: bncheck {peak:.0f} MiB, the torch.export.load script {theirs:.0f} MiB")
    info(
        f"bncheck read {read_bytes / 2**20:.1f} MiB of the {size / 2**20:.0f} MiB file "
        f"({read_bytes / size:.2%}); the BatchNorm tensors are {bn_bytes / 2**20:.1f} MiB of it"
    )
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
