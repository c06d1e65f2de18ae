"""Hypothesis mutates valid checkpoints of every format; each input must end in a report or a clean error.

The CI run uses 2,000 examples per format; fuzz/run.py runs the same property much longer."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(ROOT / "fuzz"))
from mutations import check_one, mutations, seed_files, target_name

WORK = Path(tempfile.mkdtemp(prefix="bncheck-fuzz-"))
SEEDS = seed_files(WORK)
EXAMPLES = 2000


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_mutated_checkpoints_never_crash(fmt: str) -> None:
    target = WORK / target_name(fmt)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations(fmt, SEEDS[fmt]))
    def property_holds(data: bytes) -> None:
        check_one(target, data)

    property_holds()
