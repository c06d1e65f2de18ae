"""Inspection cost against what users run today, measured as whole processes, side by side, in one run.

    python bench/inspect_speed.py [--repeats 5]

Generates once (cached in $BNCHECK_BENCH_CACHE, default ~/.cache/bncheck-bench, about 11 GB) a 1.7 GB checkpoint
with 400 BatchNorm1d layers between 1024x1024 linear layers as .pt, .safetensors and a 4-shard safetensors folder,
the same with every linear weight twice as large, and 200 small checkpoints. Then times, alternating, the median
wall time and peak RSS of:

  bncheck            bncheck inspect --json FILE
  torch.load         a script: torch.load(weights_only=True), then the statistics checked with torch
  torch.load mmap    the same with mmap=True
  safe_open          the same over safetensors.safe_open(framework="pt"), reading only the BatchNorm tensors
  floor              a script that reads the BatchNorm tensors' bytes and nothing else

and prints the ratios to bncheck, whether bncheck's time follows the BatchNorm bytes rather than the file size,
and one `bncheck inspect DIR -j 2` call against 200 separate processes.

Beside the totals it gives the CLI layer's fixed cost: from the moment the process is spawned to bncheck's first
read of a checkpoint byte (interpreter start, imports, argument parsing, configuration lookup), and the whole
`bncheck --version`. The first read is observed from outside the product: the same interpreter runs a small `-c`
wrapper that patches `LocalSource` (every local read goes through `_read`, and zipfile gets its file from `open`)
to record the wall-clock time of the first call, then calls `bncheck.cli.main()` with the same arguments.

The targets: the whole bncheck process at least 5x faster than the `torch.load(mmap=True)` script on the .pt and
the .safetensors, and bncheck's peak RSS under 100 MiB. Everything else is printed as information.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import big_checkpoints, small_checkpoints

CHECK = """
def check(tensors):
    bad = 0
    for name, t in tensors:
        if name.endswith(("running_mean", "running_var")):
            bad += int((~torch.isfinite(t)).sum())
            if name.endswith("running_var"):
                bad += int((t < 0).sum())
    print(bad)
"""
TORCH_LOAD = (
    "import sys, torch\n"
    + CHECK
    + """
state = torch.load(sys.argv[1], weights_only=True, mmap=sys.argv[2] == "mmap")
check(state.items())
"""
)
LOAD_FILE = (
    "import sys, torch\nfrom safetensors.torch import load_file\n"
    + CHECK
    + """
check(load_file(sys.argv[1]).items())
"""
)
SAFE_OPEN = (
    "import sys, torch\nfrom safetensors import safe_open\n"
    + CHECK
    + """
with safe_open(sys.argv[1], framework="pt") as f:
    check((k, f.get_tensor(k)) for k in f.keys() if k.endswith(("running_mean", "running_var", "num_batches_tracked")))
"""
)
FLOOR = """
import json, os, sys
ranges = json.load(open(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_RDONLY)
print(sum(len(os.pread(fd, length, offset)) for offset, length in ranges))
"""


@dataclass
class Sample:
    seconds: float
    peak_rss_mib: float
    first_read: float | None = None  # seconds from spawn to the first checkpoint byte read (FIRST_READ only)


# Runs `bncheck ARGS...` as `python -c FIRST_READ STAMP_FILE ARGS...`: LocalSource's first read (or first open, for
# zipfile) writes time.time() to STAMP_FILE, then both methods are restored so later reads run unpatched. The
# wrapper imports only bncheck.loaders.files before main(), a module every inspection imports anyway.
FIRST_READ = """
import os, sys, time
from bncheck.loaders.files import LocalSource

stamp_file = sys.argv[1]
sys.argv = ["bncheck", *sys.argv[2:]]
originals = (LocalSource._read, LocalSource.open)

def first_call(method):
    def record(*args, **kwargs):
        now = time.time()
        LocalSource._read, LocalSource.open = originals
        fd = os.open(stamp_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, repr(now).encode())
        os.close(fd)
        return method(*args, **kwargs)
    return record

LocalSource._read, LocalSource.open = first_call(originals[0]), first_call(originals[1])
from bncheck.cli import main
main()
"""


# Peak RSS is inherited across fork, so a command is started from this small launcher rather than from the
# benchmark process (which has torch loaded): its wait4() reports the command's own peak.
LAUNCHER = """
import json, os, sys, time
actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
spawned = time.time()  # wall clock, comparable with the time.time() that FIRST_READ records in the child
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status), spawned]))
"""


def run(command: list[str]) -> Sample:
    stamp = Path(command[3]) if command[1:3] == ["-c", FIRST_READ] else None
    if stamp is not None:
        stamp.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, check=False)
    seconds, rss_kib, code, spawned = json.loads(result.stdout)
    if code not in (0, 1):
        raise RuntimeError(f"benchmark command failed ({code}): {' '.join(command)}\n{result.stderr}")
    if stamp is None:
        return Sample(seconds, rss_kib / 1024)
    if not stamp.exists():
        raise RuntimeError(f"bncheck read no checkpoint byte: {' '.join(command)}")
    return Sample(seconds, rss_kib / 1024, float(stamp.read_text()) - spawned)


def first_read_command(args: list[str], scratch: Path) -> list[str]:
    """`bncheck ARGS` run by the FIRST_READ wrapper in this interpreter (the one bncheck's console script uses)."""
    return [sys.executable, "-c", FIRST_READ, str(scratch / "first-read.stamp"), *args]


def bn_byte_ranges(path: Path, scratch: Path) -> Path:
    """The (offset, length) of every BatchNorm tensor's bytes, from bncheck's own reader (for the floor)."""
    from bncheck.discover import find_bn_layers
    from bncheck.loaders import open_checkpoint
    from bncheck.loaders.dtypes import ITEMSIZE

    ranges = []
    for layer in find_bn_layers(open_checkpoint(path).root):
        for ref in layer.tensors.values():
            location = ref.location
            assert location is not None and location.member is None, "the floor is measured on safetensors"
            ranges.append((location.offset, ref.numel * ITEMSIZE[ref.dtype]))
    target = scratch / f"{path.stem}.ranges.json"
    target.write_text(json.dumps(ranges))
    return target


def measure(commands: dict[str, list[str]], repeats: int) -> dict[str, Sample]:
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():  # alternate, so drift in machine load hits every tool alike
            samples[name].append(run(command))
    return {
        name: Sample(
            statistics.median(s.seconds for s in runs),
            max(s.peak_rss_mib for s in runs),
            None if runs[0].first_read is None else statistics.median(s.first_read or 0.0 for s in runs),
        )
        for name, runs in samples.items()
    }


FIXED = "bncheck fixed cost"  # the FIRST_READ run of the same command; not a tool of its own


def table(title: str, results: dict[str, Sample]) -> None:
    base = results["bncheck"].seconds
    print(f"\n{title}")
    print(f"  {'tool':<16} {'median s':>9} {'peak RSS MiB':>13} {'x bncheck time':>15}")
    for name, sample in results.items():
        if name != FIXED:
            print(f"  {name:<16} {sample.seconds:>9.3f} {sample.peak_rss_mib:>13.0f} {sample.seconds / base:>15.1f}")
    fixed = results.get(FIXED)
    if fixed is not None and fixed.first_read is not None:
        print(
            f"  bncheck fixed cost: spawn to first checkpoint byte read {fixed.first_read:.3f} s (median), "
            f"{fixed.first_read / base:.0%} of bncheck's {base:.3f} s total"
        )


def verdict(label: str, ok: bool) -> None:
    print(f"  [{'PASS' if ok else 'MISS'}] {label}")


def info(label: str) -> None:
    print(f"  [INFO] {label}")


def compile_bytecode() -> str:
    """Give bncheck's modules the bytecode that `pip install .` writes. An editable install has none, and on a machine
    that sets PYTHONDONTWRITEBYTECODE (this one does) every timed run would compile bncheck from source (~17 ms) while
    torch and numpy load theirs precompiled."""
    import compileall

    import bncheck

    package = Path(bncheck.__file__).resolve().parent
    compileall.compile_dir(package, quiet=1)
    return f"bytecode compiled for {package}, as pip install writes it"


def installed_bncheck(parser: argparse.ArgumentParser) -> str:
    """The console script beside this interpreter (not a shell shim in front of it), else the one on PATH."""
    beside = Path(sys.executable).with_name("bncheck")
    bncheck = str(beside) if beside.exists() else shutil.which("bncheck")
    if bncheck is None:
        parser.error("install bncheck first: pip install -e '.[test]'")
    return bncheck


def begin_bench(doc: str) -> tuple[int, str]:
    """What every whole-process bench begins with: its command line (``--repeats``), the installed bncheck, the
    bytecode pip would have written, and the line that says how it measures. Returns (repeats, bncheck)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    repeats: int = parser.parse_args().repeats
    bncheck = installed_bncheck(parser)
    print(f"{os.cpu_count()} CPUs, median of {repeats} alternating runs, warm page cache")
    print(compile_bytecode())
    return repeats, bncheck


def main() -> None:
    repeats, bncheck = begin_bench(__doc__ or "")
    py = sys.executable
    big = big_checkpoints()
    doubled = big_checkpoints(scale=2, formats=("pt", "safetensors"))
    scratch = Path(tempfile.mkdtemp())
    version = measure({"bncheck --version": [bncheck, "--version"]}, repeats)["bncheck --version"]
    print(
        f"\nbncheck --version: {version.seconds:.3f} s (median), peak RSS {version.peak_rss_mib:.0f} MiB: "
        "the whole fixed cost of the CLI with no checkpoint"
    )
    results: dict[str, dict[str, Sample]] = {}
    for fmt, path in big.items():
        commands = {"bncheck": [bncheck, "inspect", "--json", str(path)]}
        if fmt in ("pt", "safetensors"):
            commands[FIXED] = first_read_command(["inspect", "--json", str(path)], scratch)
        if fmt == "pt":
            commands["torch.load"] = [py, "-c", TORCH_LOAD, str(path), "full"]
            commands["torch.load mmap"] = [py, "-c", TORCH_LOAD, str(path), "mmap"]
        elif fmt == "safetensors":
            commands["load_file"] = [py, "-c", LOAD_FILE, str(path)]
            commands["safe_open"] = [py, "-c", SAFE_OPEN, str(path)]
            commands["floor"] = [py, "-c", FLOOR, str(path), str(bn_byte_ranges(path, scratch))]
        size = (
            sum(p.stat().st_size for p in path.parent.glob("*.safetensors"))
            if fmt == "sharded"
            else path.stat().st_size
        )
        run(commands["bncheck"])  # warm the page cache and imports
        results[fmt] = measure(commands, repeats)
        table(f"{fmt}: {path.name} ({size / 2**30:.2f} GiB)", results[fmt])

    print("\nTargets (whole processes; the torch.load(mmap=True) script reads the .pt of the same checkpoint)")
    for fmt in ("pt", "safetensors"):
        r = results[fmt]
        ratio = results["pt"]["torch.load mmap"].seconds / r["bncheck"].seconds
        verdict(f"{fmt}: bncheck {ratio:.1f}x faster than the torch.load mmap script (target >= 5x)", ratio >= 5)
        verdict(
            f"{fmt}: bncheck peak RSS {r['bncheck'].peak_rss_mib:.0f} MiB (target < 100 MiB)",
            r["bncheck"].peak_rss_mib < 100,
        )
    print("\nFor information (no target)")
    for fmt in ("pt", "safetensors"):
        ratio = results["pt"]["torch.load"].seconds / results[fmt]["bncheck"].seconds
        info(f"{fmt}: bncheck {ratio:.1f}x faster than the full torch.load script")
    r = results["safetensors"]
    for baseline in ("safe_open", "load_file"):
        ratio = r[baseline].seconds / r["bncheck"].seconds
        info(f"safetensors: bncheck {ratio:.1f}x faster than the {baseline} script")
    for fmt, path in doubled.items():
        pair = measure(
            {
                "bncheck": [bncheck, "inspect", "--json", str(big[fmt])],
                "bncheck 2x": [bncheck, "inspect", "--json", str(path)],
            },
            repeats,
        )
        change = pair["bncheck 2x"].seconds / pair["bncheck"].seconds - 1
        info(
            f"{fmt}: non-BatchNorm bytes doubled ({big[fmt].stat().st_size / 2**30:.1f} -> "
            f"{path.stat().st_size / 2**30:.1f} GiB): bncheck {pair['bncheck'].seconds:.3f} s -> "
            f"{pair['bncheck 2x'].seconds:.3f} s, {change:+.1%}"
        )

    small = small_checkpoints()
    files = sorted(small.iterdir())
    one_call = measure({"bncheck": [bncheck, "inspect", "--json", "-j", "2", str(small)]}, 3)["bncheck"].seconds
    start = time.perf_counter()
    for file in files:
        run([bncheck, "inspect", "--json", str(file)])
    separate = time.perf_counter() - start
    info(
        f"{len(files)} small checkpoints: one `bncheck inspect DIR -j 2` {one_call:.2f} s vs {len(files)} "
        f"processes {separate:.1f} s: {separate / one_call:.1f}x"
    )
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
