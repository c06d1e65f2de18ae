"""Checking a file's layers together gives exactly what every rule gives on every layer one by one.

run_checks runs a layer rule only where its screen lets a layer through, a metadata-only rule once per distinct
metadata and a configuration rule once for all the layers without one; the summaries reduce stacked matrices.
Here thousands of layers with random defects (and random widths, dtypes, shapes and missing tensors) are checked
both ways, so a screen that misses a case or a stacked reduction that rounds differently fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_checks import MISSING, make_layer

from bncheck.checks import RULES, LayerData, Thresholds, _finding, run_checks
from bncheck.read import stack_layers
from bncheck.report import LayerConfig, Setting
from bncheck.summary import _summary, summaries


def random_layer(rng: np.random.Generator, i: int) -> LayerData:
    """A layer of a random width with, most of the time, one random defect."""
    width = int(rng.choice([0, 1, 3, 8, 64, 100]))
    dtype = str(rng.choice(["float32", "float32", "float16", "float64", "int64"]))
    mean = (rng.normal(0, 1, width) * float(rng.choice([1, 1e4]))).astype(dtype)
    var = rng.uniform(0.5, 2, width).astype(dtype)
    arrays: dict[str, object] = {
        "mean": mean,
        "var": var,
        "count": np.array(int(rng.choice([0, 10, 1000])), dtype=np.int64),
        "weight": np.ones(width, np.float32),
        "bias": np.zeros(width, np.float32),
    }
    defect = int(rng.integers(0, 16))
    channel = int(rng.integers(0, max(width, 1)))
    floating = dtype != "int64" and width > 0
    if defect == 0 and floating:
        arrays["var"][channel] = rng.choice([np.nan, np.inf, -np.inf])
    elif defect == 1 and floating:
        arrays["mean"][channel] = np.nan
    elif defect == 2 and floating:
        arrays["var"][channel] = -0.5
    elif defect == 3 and floating:
        arrays["var"][channel] = rng.choice([0.0, 1e-9])
    elif defect == 4:
        arrays["mean"], arrays["var"] = np.zeros(width, dtype), np.ones(width, dtype)
        arrays["count"] = [np.array(0), MISSING][int(rng.integers(0, 2))]
    elif defect == 5:
        arrays["count"] = [np.array(-3), np.array(2.0), np.array([1, 2]), MISSING][int(rng.integers(0, 4))]
    elif defect == 6:
        arrays[str(rng.choice(["mean", "var", "weight", "bias"]))] = MISSING
    elif defect == 7:
        arrays["var"] = rng.uniform(0.5, 2, (2, width + 1)).astype(np.float32)  # not 1-D, and defective
        arrays["var"][1, 0] = rng.choice([np.nan, -1.0, 0.0])
    elif defect == 8:
        arrays["weight"] = np.ones(width + 1, np.float32)
    elif defect == 9 and width:
        arrays[str(rng.choice(["weight", "bias"]))] = np.full(width, np.nan, np.float32)
    elif defect == 10:
        arrays["count"] = np.array(int(rng.choice([1, 100])), dtype=np.int64)  # a count spread (BN013)
    elif defect == 11 and width:
        arrays["mean"] = np.full(width, 3e4, np.float16)
    data = make_layer(
        f"layers.{i}.bn",
        mean=arrays["mean"],
        var=arrays["var"],
        count=arrays["count"],
        weight=arrays["weight"],
        bias=arrays["bias"],
    )
    if defect == 12:  # a recorded configuration (BN014, BN015): rules see it layer by layer
        setting = Setting(value=float(rng.choice([0.1, 0.99, 0.0])), source="pickled module")
        data = LayerData(data.layer, data.arrays, LayerConfig(momentum=setting, eps=setting))
    return data


def one_by_one(layers: list[LayerData], t: Thresholds) -> list:
    """The definition: every layer and configuration rule on every layer, the model rules on all of them."""
    per_layer: dict[int, list] = {id(data): [] for data in layers}
    for r in RULES.values():
        if r.scope == "layer":
            for data in layers:
                per_layer[id(data)] += [_finding(r, hit, t, data.layer) for hit in r.check(data, t)]
        elif r.scope == "config":
            for data in layers:
                per_layer[id(data)] += [_finding(r, hit, t, data.layer) for hit in r.check(data.config, t)]
        elif r.scope == "model":
            for data, hit in r.check(layers, t):
                per_layer[id(data)].append(_finding(r, hit, t, data.layer))
    return [finding for data in layers for finding in sorted(per_layer[id(data)], key=lambda f: f.code)]


@pytest.mark.parametrize("seed", range(4))
def test_checking_layers_together_finds_what_checking_them_one_by_one_finds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = [random_layer(rng, i) for i in range(1500)]
    t = Thresholds()
    expected = one_by_one(layers, t)
    assert run_checks(layers, thresholds=t) == expected
    # every value screen was exercised: each of these rules fires somewhere in the sample
    assert {f.code for f in expected} >= {r.code for r in RULES.values() if r.screen is not None}


@pytest.mark.parametrize("seed", range(2))
def test_stacked_summaries_equal_each_layers_own(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = [random_layer(rng, i) for i in range(1500)]
    stack = stack_layers(layers)
    for name in ("running_mean", "running_var"):
        assert summaries(layers, stack, name) == [_summary(data.floats(name)) for data in layers]
