"""What keeps the cost of a many-layer checkpoint per layer (issue 18) that a timing would not show reliably."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

import bncheck


@pytest.fixture
def many_layers(tmp_path: Path) -> Path:
    import torch

    state = {}
    for i in range(400):
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"layers.{i}.bn.{name}"] = torch.rand(8)
        state[f"layers.{i}.bn.num_batches_tracked"] = torch.tensor(10)
    path = tmp_path / "many.pt"
    torch.save(state, path)
    return path


def test_inspecting_a_torch_file_leaves_no_cycle_holding_its_objects(many_layers: Path) -> None:
    """An unbroken cycle through the unpickler kept every object of the file (about 100 per tensor) until the cyclic
    collector ran: memory and collector time that grew with the layers of every file of a run."""
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    try:
        report = bncheck.inspect(many_layers)
        assert report.layer_count == 400
        del report
        assert gc.collect() < 2000  # a fixed few hundred, not some per tensor (2,000 tensors here)
    finally:
        if collecting:
            gc.enable()


def test_inspection_restores_the_garbage_collector_thresholds(many_layers: Path) -> None:
    before = gc.get_threshold()
    bncheck.inspect(many_layers)
    assert gc.get_threshold() == before
