"""Time bncheck's train-mode recomputation against torch.optim.swa_utils.update_bn on the same model and data.

    python bench/recompute_speed.py [--repeats 7]

Both run in this process, alternating, on a plain tabular MLP and on the same body with a heavy head after its
last BatchNorm (which bncheck does not need to run). Prints the median wall time of each and the ratio
bncheck / update_bn (below 1.0 means bncheck is faster).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bncheck.recompute import Batch, recompute_statistics

ROOT = Path(__file__).resolve().parent.parent


def factories() -> dict[str, Callable[[], torch.nn.Module]]:
    spec = importlib.util.spec_from_file_location("models", ROOT / "fixtures" / "recompute" / "models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    return {"tabular MLP": models.tabular_mlp, "MLP + heavy head": models.heavy_head_mlp}


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.samples, 20)
    chunks = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    batches = [Batch((chunk,)) for chunk in chunks]
    print(
        f"{args.samples} samples in batches of {args.batch_size}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} alternating runs"
    )
    print(f"{'model':<18} {'bncheck (s)':>12} {'update_bn (s)':>14} {'ratio':>7}")
    for label, make in factories().items():
        model = make()
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(timed(lambda model=model: recompute_statistics(model, batches)))
            reference = copy.deepcopy(model)
            theirs.append(timed(lambda reference=reference: torch.optim.swa_utils.update_bn(chunks, reference)))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{label:<18} {a:>12.4f} {b:>14.4f} {a / b:>7.2f}")


if __name__ == "__main__":
    main()
