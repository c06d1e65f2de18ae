"""Inspecting an ONNX model against reading its BatchNorm tensors with the onnx package, as whole processes, side by
side, in one run.

    python bench/onnx_speed.py [--repeats 5]

Exports once (cached in $BNCHECK_BENCH_CACHE, default ~/.cache/bncheck-bench, about 1.9 GB) the model of
checkpoints.deep_bn_model: 400 BatchNorm2d layers between 3x3 convolutions of 256 channels, 945 MB of weights, as
deep-conv.onnx with its tensors in deep-conv.onnx.data (external data), and as one file with every tensor embedded.
Then times, alternating, the median wall time and peak RSS of:

  bncheck            bncheck inspect --json MODEL
  onnx.load          a script: onnx.load(MODEL) (external data included, as it loads by default), then
                     numpy_helper.to_array over the 1,600 BatchNorm tensors and the same checks of their values
  onnx lazy          the same with onnx.load(load_external_data=False) and to_array(base_dir=...) reading each
                     BatchNorm tensor's external bytes alone: the least the onnx package can be made to read
  floor              a script that reads the BatchNorm tensors' bytes and nothing else

and prints the ratios. The targets, on the external-data model: bncheck at least 5x faster than the onnx.load
script, and its peak RSS under 100 MiB. The embedded model is measured for information: onnx.load must parse the
whole 945 MB file, bncheck skips the convolution weights by their lengths.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import deep_onnx
from inspect_speed import Sample, begin_bench, info, measure, run, table, verdict

READ_WITH_ONNX = """
import os, sys
import numpy as np
import onnx
from onnx import numpy_helper

lazy = sys.argv[2] == "lazy"
model = onnx.load(sys.argv[1], load_external_data=not lazy)
identity = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Identity"}
tensors = {tensor.name: tensor for tensor in model.graph.initializer}
bad = 0
for node in model.graph.node:
    if node.op_type != "BatchNormalization":
        continue
    for position, name in enumerate(node.input[1:]):
        while name not in tensors:
            name = identity[name]
        values = numpy_helper.to_array(tensors[name], base_dir=os.path.dirname(sys.argv[1]) if lazy else "")
        bad += int((~np.isfinite(values)).sum()) + (int((values < 0).sum()) if position == 3 else 0)
print(bad)
"""
FLOOR = """
import json, os, sys
ranges = json.load(open(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_RDONLY)
print(sum(len(os.pread(fd, length, offset)) for offset, length in ranges))
"""


def bn_byte_ranges(path: Path, scratch: Path) -> tuple[Path, Path]:
    """The external data file and the (offset, length) of every BatchNorm tensor's bytes in it, from bncheck's own
    reader (for the floor)."""
    from bncheck.discover import find_bn_layers
    from bncheck.loaders import open_checkpoint
    from bncheck.loaders.dtypes import ITEMSIZE

    ranges, files = [], set()
    for layer in find_bn_layers(open_checkpoint(path).root, batch_counter=False):
        for ref in layer.tensors.values():
            assert ref.location is not None
            files.add(ref.location.path)
            ranges.append((ref.location.offset, ref.numel * ITEMSIZE[ref.dtype]))
    (data,) = files
    target = scratch / "deep-conv.ranges.json"
    target.write_text(json.dumps(ranges))
    return data, target


def main() -> None:
    repeats, bncheck = begin_bench(__doc__ or "")
    py = sys.executable
    models = deep_onnx()
    scratch = Path(tempfile.mkdtemp())
    external, embedded = models["external"], models["embedded"]
    data, ranges = bn_byte_ranges(external, scratch)
    results: dict[str, dict[str, Sample]] = {}
    for label, path, extra in (
        ("external", external, {"onnx lazy": [py, "-c", READ_WITH_ONNX, str(external), "lazy"]}),
        ("embedded", embedded, {}),
    ):
        commands = {
            "bncheck": [bncheck, "inspect", "--json", str(path)],
            "onnx.load": [py, "-c", READ_WITH_ONNX, str(path), "full"],
            **extra,
        }
        if label == "external":
            commands["floor"] = [py, "-c", FLOOR, str(data), str(ranges)]
        for command in commands.values():
            run(command)  # warm the page cache and imports
        results[label] = measure(commands, repeats)
        size = path.stat().st_size + (data.stat().st_size if label == "external" else 0)
        table(f"{label}: {path.name} ({size / 2**30:.2f} GiB with its data)", results[label])

    print("\nTargets (whole processes, the external-data model)")
    r = results["external"]
    ratio = r["onnx.load"].seconds / r["bncheck"].seconds
    verdict(f"bncheck {ratio:.1f}x faster than the onnx.load + numpy_helper script (target >= 5x)", ratio >= 5)
    verdict(f"bncheck peak RSS {r['bncheck'].peak_rss_mib:.0f} MiB (target < 100 MiB)", r["bncheck"].peak_rss_mib < 100)
    print("\nFor information (no target)")
    info(f"external: bncheck {r['onnx lazy'].seconds / r['bncheck'].seconds:.1f}x faster than the lazy onnx script")
    e = results["embedded"]
    info(
        f"embedded: bncheck {e['onnx.load'].seconds / e['bncheck'].seconds:.1f}x faster than the onnx.load script, "
        f"peak RSS {e['bncheck'].peak_rss_mib:.0f} MiB against {e['onnx.load'].peak_rss_mib:.0f} MiB"
    )
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
