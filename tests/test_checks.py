"""Each rule on arrays that must trigger it and on arrays that must not."""

from __future__ import annotations

import numpy as np
import pytest

from bncheck.checks import RULES, LayerData, Thresholds, run_checks
from bncheck.discover import BNLayer
from bncheck.loaders.interface import in_memory
from bncheck.report import Severity

C = 8
rng = np.random.default_rng(0)
HEALTHY_MEAN = rng.normal(0, 1, C).astype(np.float32)
HEALTHY_VAR = rng.uniform(0.5, 2, C).astype(np.float32)
MISSING = object()


def make_layer(
    name: str = "bn",
    *,
    mean: object = HEALTHY_MEAN,
    var: object = HEALTHY_VAR,
    count: object = np.array(100, dtype=np.int64),
    weight: object = np.ones(C, np.float32),
    bias: object = np.zeros(C, np.float32),
    dtypes: dict[str, str] | None = None,
    kind: str = "BatchNorm1d",
    source: str = "",
    averaged: bool = False,
) -> LayerData:
    arrays = {"running_mean": mean, "running_var": var, "num_batches_tracked": count, "weight": weight, "bias": bias}
    refs = {}
    for key, array in arrays.items():
        if array is MISSING:
            continue
        array = np.asarray(array)
        dtype = (dtypes or {}).get(key) or str(array.dtype)
        refs[key] = in_memory(array, dtype)
    layer = BNLayer(name, source, averaged, kind, False, refs)
    return LayerData(layer, {key: ref.read() for key, ref in refs.items()})


def codes(*layers: LayerData, globals_named: tuple[str, ...] = (), thresholds: Thresholds | None = None) -> list[str]:
    return [f.code for f in run_checks(list(layers), globals_named, thresholds=thresholds)]


def test_a_healthy_layer_has_no_finding() -> None:
    assert codes(make_layer()) == []


def test_bn001_names_the_nonfinite_channels() -> None:
    var = HEALTHY_VAR.copy()
    var[[1, 5]] = [np.nan, np.inf]
    mean = HEALTHY_MEAN.copy()
    mean[7] = -np.inf
    findings = run_checks([make_layer(mean=mean, var=var)])
    assert [(f.code, f.tensor, f.channels) for f in findings] == [
        ("BN001", "running_mean", (7,)),
        ("BN001", "running_var", (1, 5)),
    ]
    assert "1 NaN, 1 +Inf" in findings[1].message
    assert findings[0].severity is Severity.ERROR


def test_bn002_negative_variance_but_not_zero() -> None:
    var = HEALTHY_VAR.copy()
    var[[0, 3]] = [-0.5, -1e-3]
    (finding,) = run_checks([make_layer(var=var)])
    assert (finding.code, finding.channels, finding.channel_count) == ("BN002", (0, 3), 2)
    assert "min -0.5" in finding.message
    assert "BN002" not in codes(make_layer(var=np.full(C, 0.0, np.float32)))


def test_bn003_shapes() -> None:
    assert codes(make_layer(mean=np.zeros((C, 1), np.float32))) == ["BN003"]
    assert codes(make_layer(mean=HEALTHY_MEAN[:4])) == ["BN003"]
    assert codes(make_layer(weight=np.ones(C + 1, np.float32))) == ["BN003"]
    assert codes(make_layer(weight=MISSING, bias=MISSING)) == []


def test_bn004_integer_or_bool_statistics() -> None:
    assert codes(make_layer(var=np.ones(C, np.int64))) == ["BN004"]
    assert codes(make_layer(mean=np.zeros(C, bool))) == ["BN004"]
    assert codes(make_layer(mean=HEALTHY_MEAN.astype(np.float64), var=HEALTHY_VAR.astype(np.float16))) == []


@pytest.mark.parametrize(
    ("count", "fires"),
    [
        (np.array(5.0, np.float32), True),
        (np.array([1, 2], np.int64), True),
        (np.array(-3, np.int64), True),
        (np.array(0, np.int64), False),
        (np.array([7], np.int64), False),
        (np.array(2**40, np.int64), False),
    ],
)
def test_bn005_counter(count: np.ndarray, fires: bool) -> None:
    assert ("BN005" in codes(make_layer(count=count))) is fires


def test_bn006_one_statistic_missing() -> None:
    (finding,) = run_checks([make_layer(var=MISSING)])
    assert (finding.code, finding.tensor) == ("BN006", "running_var")
    assert codes(make_layer(mean=MISSING)) == ["BN006"]


def test_bn007_initial_values() -> None:
    initial = {"mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
    assert codes(make_layer(**initial, count=np.array(0))) == ["BN007"]
    assert codes(make_layer(**initial, count=MISSING)) == ["BN007", "BN010"]
    # identity statistics with a positive counter are not "never updated" (and cannot come from training)
    assert codes(make_layer(**initial, count=np.array(10))) == []
    # a zero counter with real statistics (InstanceNorm never counts) is fine
    assert codes(make_layer(count=np.array(0))) == []
    assert RULES["BN007"].severity is Severity.WARNING


def test_bn008_near_zero_variance_threshold() -> None:
    var = HEALTHY_VAR.copy()
    var[2] = 0.0
    var[4] = 5e-9
    (finding,) = run_checks([make_layer(var=var)])
    assert (finding.code, finding.channels) == ("BN008", (2, 4))
    var[4] = 2e-8
    assert [f.channels for f in run_checks([make_layer(var=var)])] == [(2,)]
    var[2] = 1e-10
    assert codes(make_layer(var=var), thresholds=Thresholds(min_variance=1e-12)) == []


def test_bn009_float16_near_overflow() -> None:
    var = HEALTHY_VAR.astype(np.float16)
    var[1] = 30000
    finding = run_checks([make_layer(var=var, mean=HEALTHY_MEAN.astype(np.float16))])[0]
    assert (finding.code, finding.tensor, finding.channels) == ("BN009", "running_var", (1,))
    var[1] = 10000
    assert codes(make_layer(var=var, mean=HEALTHY_MEAN.astype(np.float16))) == []
    # the same value in float32 is not at risk
    assert codes(make_layer(var=np.full(C, 30000, np.float32))) == []


def test_bn009_bfloat16_rounding_of_a_large_mean() -> None:
    mean = HEALTHY_MEAN.copy()
    mean[6] = 2016.0  # bfloat16 step at 2016 is 8: rounding error up to 4, i.e. 4 std for var 1
    var = np.ones(C, np.float32)
    bf16 = {"running_mean": "bfloat16", "running_var": "bfloat16"}
    finding = run_checks([make_layer(mean=mean, var=var, dtypes=bf16)])[0]
    assert (finding.code, finding.channels) == ("BN009", (6,))
    # float32 keeps 2016 exact to 1e-4: no finding; float16 (step 1 at 2016) is still too coarse for std 1
    assert codes(make_layer(mean=mean, var=var)) == []
    assert codes(make_layer(mean=mean.astype(np.float16), var=var.astype(np.float16))) == ["BN009"]
    # with a std of 100 the same mean is stored finely enough
    assert codes(make_layer(mean=mean, var=np.full(C, 1e4, np.float32), dtypes=bf16)) == []


def test_bn010_missing_counter() -> None:
    assert codes(make_layer(count=MISSING)) == ["BN010"]


def test_bn011_affine_nonfinite() -> None:
    weight = np.ones(C, np.float32)
    weight[3] = np.nan
    (finding,) = run_checks([make_layer(weight=weight)])
    assert (finding.code, finding.tensor, finding.channels) == ("BN011", "weight", (3,))


def test_bn013_counter_spread_within_one_model_only() -> None:
    backbone = make_layer("backbone.bn", count=np.array(30))
    head = make_layer("head.bn", count=np.array(150))
    findings = run_checks([backbone, head])
    assert [(f.code, f.layer, f.severity) for f in findings] == [("BN013", "backbone.bn", Severity.INFO)]
    # a layer in another state dict of the same file, an EMA copy, or an InstanceNorm is not compared
    other_model = make_layer("backbone.bn", count=np.array(30), source="model_b")
    ema = make_layer("head.bn", count=np.array(1), averaged=True)
    instance = make_layer("inorm", count=np.array(0), kind="InstanceNorm1d")
    assert codes(other_model, head, ema, instance) == []
    assert codes(backbone, head, thresholds=Thresholds(count_spread_ratio=10)) == []


def test_bn101_is_a_file_finding_listing_the_dangerous_globals_only() -> None:
    findings = run_checks([make_layer()], ("argparse.Namespace", "posix.system", "builtins.eval"))
    assert [(f.code, f.layer) for f in findings] == [("BN101", None)]
    assert "posix.system, builtins.eval" in findings[0].message
    assert "argparse" not in findings[0].message


def test_bn102_names_the_unknown_globals_and_nothing_else() -> None:
    named = ("__main__.MLP", "torch.nn.modules.linear.Linear", "gzip:os.system", "my_project.models:ResNet.Config")
    findings = run_checks([make_layer()], named)
    assert [(f.code, f.severity, f.layer) for f in findings] == [
        ("BN101", Severity.ERROR, None),
        ("BN102", Severity.WARNING, None),
    ]
    assert findings[0].message == "pickle names gzip:os.system; bncheck did not run it"
    assert findings[1].message.startswith("pickle names __main__.MLP, my_project.models:ResNet.Config; ")


def test_known_harmless_globals_are_no_finding() -> None:
    harmless = ("argparse.Namespace", "torch.nn.modules.batchnorm.BatchNorm1d", "__torch__.models.Net")
    assert run_checks([make_layer()], harmless) == []


def test_channel_lists_are_capped_but_counts_exact() -> None:
    var = -np.ones(200, np.float32)
    finding = run_checks(
        [make_layer(mean=np.zeros(200, np.float32), var=var, weight=MISSING, bias=MISSING)],
        thresholds=Thresholds(max_channels_listed=10),
    )[0]
    assert finding.channels == tuple(range(10))
    assert finding.channel_count == 200


def test_every_rule_documents_what_why_fix() -> None:
    for rule in RULES.values():
        assert rule.doc.startswith("What:"), rule.code
        assert "\n\nWhy:" in rule.doc and "\n\nFix:" in rule.doc, rule.code
        assert rule.summary and rule.hint, rule.code
