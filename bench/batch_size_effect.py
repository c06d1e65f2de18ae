"""How the batch size of recomputation moves each layer's train-mode statistics, on a conv net and an MLP trained
here on scikit-learn's digits (8x8 images).

    python bench/batch_size_effect.py

In train mode every BatchNorm normalises with its batch's statistics, so what a deeper layer receives depends on
the batches that passed through the layers before it. For each batch size this recomputes the statistics on the
same 512 held-out images and prints, per layer, the drift (BN012's measures, median channel) from the statistics
recomputed with batches of 256. The first BatchNorm's inputs do not depend on the batches: its drift is 0 at every
size.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from bncheck.drift import measure_drift
from bncheck.recompute import Batch, recompute_statistics

SIZES = (2, 4, 8, 16, 32, 64, 256)


def conv_net() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))  # fmt: skip


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))  # fmt: skip


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        for index in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
    return model.eval()


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    train, sample = slice(0, 1200), slice(1200, 1712)  # 512 samples: every batch size divides it
    print(f"{torch.get_num_threads()} threads; drift from batches of 256, median channel: mean shift (std) / "
          "|log var ratio|")  # fmt: skip
    for label, make in (("conv net", conv_net), ("MLP", mlp)):
        torch.manual_seed(0)
        model = trained(make(), x[train], y[train])
        data = x[sample]
        results = {
            size: recompute_statistics(model, [Batch((data[i : i + size],)) for i in range(0, len(data), size)])
            for size in SIZES
        }
        reference = results[256].layers
        print(f"\n{label} ({len(data)} samples)")
        print(f"{'batch':>6} " + " ".join(f"{'layer ' + name:>16}" for name in reference))
        for size in SIZES[:-1]:
            cells = []
            for name, ref in reference.items():
                stats = results[size].layers[name]
                drift = measure_drift(stats.mean_pooled, stats.var_pooled, ref.mean_pooled, ref.var_pooled,
                                      samples=None)  # fmt: skip
                cells.append(f"{drift.mean_shift_median:.3f} / {drift.log_var_ratio_median:.3f}")
            print(f"{size:>6} " + " ".join(f"{cell:>16}" for cell in cells))


if __name__ == "__main__":
    main()
