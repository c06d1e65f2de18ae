"""Time bncheck's train-mode recomputation against torch.optim.swa_utils.update_bn (and fvcore's PreciseBN,
when installed) on the same model and data, and measure how far its statistics are from a float64 reference.

    python bench/recompute_speed.py [--repeats 7] [--skip-fvcore]

Everything runs in this process, alternating bncheck / update_bn / PreciseBN within each repeat, on:
a small ResNet (64x64 RGB images, contiguous and channels_last), a plain tabular MLP, and the same MLP body with a
heavy head after its last BatchNorm (which bncheck does not need to run). Prints the median wall time of each and
the ratios bncheck / update_bn and bncheck / PreciseBN (below 1.0 means bncheck is faster).

The accuracy columns compare bncheck's pooled ("exact" estimator) statistics with a float64 reference: a float64
copy of the model runs in train mode on the same batches (in float64), each BatchNorm's input is captured, and a
first pass sums it for the mean, a second the squared deviations from that mean. The copy is float64 because
PyTorch's own float32 channels_last CPU kernel is off by ~1e-5 in the variance, so float32 train-mode inputs of
later layers would be a wrong reference (they differ from the exact ones by that much). The variance error is
relative; the mean error is |mean - ref| / (ref_std + |ref_mean|), since plain relative error is meaningless for
means near 0.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bncheck.recompute import Batch, batchnorm_modules, recompute_statistics

ROOT = Path(__file__).resolve().parent.parent


def fixture_models() -> Any:
    spec = importlib.util.spec_from_file_location("models", ROOT / "fixtures" / "recompute" / "models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    return models


@dataclass
class Case:
    label: str
    model: torch.nn.Module
    chunks: list[torch.Tensor]


def cases(samples_images: int, samples_tabular: int, batch_size: int) -> list[Case]:
    models = fixture_models()
    torch.manual_seed(0)
    images = torch.randn(samples_images, 3, 64, 64)
    tabular = torch.randn(samples_tabular, 20)

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]

    resnet = models.small_resnet()
    resnet_cl = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
    return [
        Case("ResNet 64x64", resnet, split(images)),
        Case("ResNet channels_last", resnet_cl, split(images.contiguous(memory_format=torch.channels_last))),
        Case("tabular MLP", models.tabular_mlp(), split(tabular)),
        Case("MLP + heavy head", models.heavy_head_mlp(), split(tabular)),
    ]


def timed(run: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def run_fvcore(model: torch.nn.Module, chunks: list[torch.Tensor]) -> None:
    from fvcore.nn.precise_bn import update_bn_stats

    model.train()  # PreciseBN leaves the mode to the caller; this is how it is used
    update_bn_stats(model, chunks, num_iters=len(chunks))


def float64_reference(model: torch.nn.Module, chunks: list[torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each BatchNorm's pooled mean and unbiased variance over everything it received, in float64, two-pass."""
    model = copy.deepcopy(model).double()
    chunks = [chunk.double() for chunk in chunks]
    modules = batchnorm_modules(model)
    model.eval()
    for module in modules.values():
        module.train()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    means: dict[str, torch.Tensor] = {}

    def first(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double()
            dims = [d for d in range(x.dim()) if d != 1]
            sums[name] = sums.get(name, 0) + x.sum(dims)  # type: ignore[operator]
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]

        return hook

    def second(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double()
            dims = [d for d in range(x.dim()) if d != 1]
            shape = [1, -1] + [1] * (x.dim() - 2)
            sums[name] = sums.get(name, 0) + ((x - means[name].view(shape)) ** 2).sum(dims)  # type: ignore[operator]

        return hook

    with torch.no_grad():
        handles = [m.register_forward_pre_hook(first(n)) for n, m in modules.items()]
        for chunk in chunks:
            model(chunk)
        for handle in handles:
            handle.remove()
        means = {name: total / counts[name] for name, total in sums.items()}
        sums.clear()
        handles = [m.register_forward_pre_hook(second(n)) for n, m in modules.items()]
        for chunk in chunks:
            model(chunk)
        for handle in handles:
            handle.remove()
    return {name: (means[name].numpy(), (sums[name] / (counts[name] - 1)).numpy()) for name in means}


def max_errors(model: torch.nn.Module, chunks: list[torch.Tensor]) -> tuple[float, float]:
    reference = float64_reference(model, chunks)
    result = recompute_statistics(model, [Batch((c,)) for c in chunks])
    mean_err = var_err = 0.0
    for name, (mean, var) in reference.items():
        stats = result.layers[name]
        mean_err = max(mean_err, float(np.max(np.abs(stats.mean_pooled - mean) / (np.sqrt(var) + np.abs(mean)))))
        var_err = max(var_err, float(np.max(np.abs(stats.var_pooled - var) / var)))
    return mean_err, var_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image-samples", type=int, default=2000)
    parser.add_argument("--tabular-samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--skip-fvcore", action="store_true")
    args = parser.parse_args()
    have_fvcore = not args.skip_fvcore and importlib.util.find_spec("fvcore") is not None
    print(
        f"{args.image_samples} images (3x64x64) / {args.tabular_samples} tabular samples in batches of "
        f"{args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.repeats} alternating runs"
    )
    if not have_fvcore:
        print("fvcore PreciseBN: skipped (" + ("--skip-fvcore" if args.skip_fvcore else "fvcore not installed") + ")")
    print(
        "max error vs float64 reference: mean as |mean - ref| / (ref_std + |ref_mean|) (means near 0 make plain "
        "relative error meaningless), variance relative"
    )
    header = (
        f"{'model':<21} {'bncheck s':>10} {'update_bn s':>12} {'ratio':>6} {'PreciseBN s':>12} {'ratio':>6}"
        f" {'mean err':>9} {'var err':>9}"
    )
    print(header)
    for case in cases(args.image_samples, args.tabular_samples, args.batch_size):
        batches = [Batch((chunk,)) for chunk in case.chunks]
        ours: list[float] = []
        theirs: list[float] = []
        fvcore: list[float] = []
        for _ in range(args.repeats):
            ours.append(timed(recompute_statistics, case.model, batches))
            theirs.append(timed(torch.optim.swa_utils.update_bn, case.chunks, copy.deepcopy(case.model)))
            if have_fvcore:
                fvcore.append(timed(run_fvcore, copy.deepcopy(case.model), case.chunks))
        mean_err, var_err = max_errors(case.model, case.chunks)
        a, b = statistics.median(ours), statistics.median(theirs)
        c = f"{'-':>12} {'-':>6}"
        if fvcore:
            c = f"{statistics.median(fvcore):>12.4f} {a / statistics.median(fvcore):>6.2f}"
        print(f"{case.label:<21} {a:>10.4f} {b:>12.4f} {a / b:>6.2f} {c} {mean_err:>9.1e} {var_err:>9.1e}")


if __name__ == "__main__":
    main()
