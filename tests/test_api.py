"""The library, driven without the CLI: bncheck.inspect() with one frozen Options value."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import BAD, GOOD

import bncheck
from bncheck import Options, RuleSelection, Severity, Thresholds


def test_public_names_are_exported() -> None:
    for name in bncheck.__all__:
        assert getattr(bncheck, name) is not None
    assert bncheck.RecomputeRequest(model="m.py:f", data="x.npy").batch_size == 64


def test_options_are_frozen_and_keyword_only() -> None:
    options = Options(fail_on=Severity.WARNING)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.jobs = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        Options(Thresholds())  # type: ignore[misc]


def test_defaults_find_errors_and_a_bad_file_is_a_value_not_an_exception(tmp_path) -> None:
    missing = tmp_path / "missing.pt"
    report = bncheck.inspect([BAD / "BN002-negative-var.safetensors", missing])
    negative, absent = report.files
    assert [f.code for f in negative.findings] == ["BN002"]
    assert absent.error is not None and absent.error.code == "not-found"
    assert report.unreadable and report.failed and not report.ok


def test_fail_level_selection_and_thresholds_come_from_options() -> None:
    path = BAD / "BN008-constant-feature.pt"
    assert bncheck.inspect(path).ok  # a warning does not fail at the default level
    assert not bncheck.inspect(path, options=Options(fail_on=Severity.WARNING)).ok
    ignored = bncheck.inspect(path, options=Options(selection=RuleSelection(ignore=("BN008",))))
    assert ignored.files[0].findings == ()
    # a looser threshold than the constant feature's 1.87e-14 variance silences it
    loose = bncheck.inspect(path, options=Options(thresholds=Thresholds(min_variance=1e-15)))
    assert loose.files[0].findings == ()


def test_jobs_and_exclude(tmp_path) -> None:
    serial = bncheck.inspect(GOOD, options=Options(exclude=("*legacy*",)))
    parallel = bncheck.inspect(GOOD, options=Options(exclude=("*legacy*",), jobs=2))
    assert serial == parallel
    assert serial.files and not any("legacy" in file.path for file in serial.files)
    assert serial.ok


def test_inspect_file_reports_one_checkpoint() -> None:
    file = bncheck.api.inspect_file(GOOD / "conv1d-sharded")
    assert file.format == "safetensors, 2 shards" and file.error is None and len(file.layers) == 2
