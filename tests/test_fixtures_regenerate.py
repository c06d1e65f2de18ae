"""The checked-in fixtures are what the seeded generator makes (tensors compared; bytes embed file names), and
bncheck reports the same rule codes on a regenerated fixture as on the shipped one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from bncheck.api import inspect_file
from bncheck.loaders import find_checkpoints, open_checkpoint
from bncheck.loaders.interface import TensorRef
from bncheck.loaders.restricted_pickle import Placeholder

FOLDERS = ("good", "bad", "recompute")

# Trained float values are compared with a tolerance, everything else exactly. The generator is seeded and
# single-threaded, but CPU kernels (oneDNN convolutions, vectorised reductions) pick different instruction sets on
# different CPUs (AMD vs Intel, AVX2 vs AVX-512) and round differently: a fixture regenerated on another machine
# differs from the shipped one by about 1e-7 (4e-5 relative at most, seen between an AMD and an Intel machine).
# rtol=1e-4 / atol=1e-6 is a hundred times that noise and still far below any change a code edit would make. A
# value stored in float16 or bfloat16 is that noise rounded to the half type, which can move it by one unit in the
# last place, so those get the relative tolerance of one ulp of their type.
RTOL = {"float64": 1e-4, "float32": 1e-4, "float16": 2.0**-10, "bfloat16": 2.0**-7}
ATOL = 1e-6
# The one fixture whose trained values are chaotic by design: SGD on an unscaled target diverges in float32 until the
# activations overflow, and on the way the weights pass through 1e10 and beyond, where the rounding of one kernel
# decides the next step (two weights 1.2e10 apart between AVX2 and SSE4.1 builds). What it is for is where it is
# non-finite, and that is compared exactly: names, dtypes and shapes as for every fixture, then for every float
# tensor which entries are NaN, +inf or -inf, not the finite values between them.
CHAOTIC = {"bad/BN001-diverged-nan.pt"}
# Fixtures made with an optional library, by the generator function that makes them: without the library (or with
# another version of it, whose initialisation may differ) the function is skipped, or its output not compared, and
# the shipped copy stands. Its config.json's BatchNorm keys are compared whenever it was regenerated.
OPTIONAL = {"bn014_hf_efficientnet": "bad/BN014-hf-efficientnet"}


def non_finite_pattern(values: np.ndarray) -> np.ndarray:
    """0 where finite, 1 NaN, 2 +inf, 3 -inf."""
    values = values.astype(np.float64)
    return np.select([np.isnan(values), values == np.inf, values == -np.inf], [1, 2, 3], 0)


def all_tensors(
    node: object, path: str = "", out: dict[str, TensorRef] | None = None, seen: set[int] | None = None
) -> dict[str, TensorRef]:
    """Every tensor of the object tree by its path; an object met again (a lazy module's pickle reaches the module
    again through its hooks) is walked once."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(node) in seen:
        return out
    if isinstance(node, TensorRef):
        out[path] = node
    elif isinstance(node, dict):
        seen.add(id(node))
        for key, value in node.items():
            all_tensors(value, f"{path}/{key}", out, seen)
    elif isinstance(node, list | tuple):
        seen.add(id(node))
        for index, value in enumerate(node):
            all_tensors(value, f"{path}/{index}", out, seen)
    elif isinstance(node, Placeholder):
        seen.add(id(node))
        for index, part in enumerate((node.args, node.kwargs, node.state, node.items, node.dictitems)):
            all_tensors(part, f"{path}/{index}", out, seen)
    return out


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    sys.path.insert(0, str(FIXTURES))
    import make_fixtures

    skipped = make_fixtures.make_all(out)
    assert set(skipped) <= set(OPTIONAL), skipped
    return out


def not_compared(regenerated: Path) -> set[str]:
    """The optional fixtures that were not regenerated here, or were made by another version of their library."""
    left = set()
    for made in OPTIONAL.values():
        shipped, fresh = FIXTURES / made / "config.json", regenerated / made / "config.json"
        version = "transformers_version"
        if not fresh.exists() or json.loads(fresh.read_text())[version] != json.loads(shipped.read_text())[version]:
            left.add(made)
    return left


def test_regenerated_optional_fixtures_keep_their_batchnorm_config(regenerated: Path) -> None:
    keys = ("model_type", "batch_norm_momentum", "batch_norm_eps")
    for made in OPTIONAL.values():
        fresh = regenerated / made / "config.json"
        if fresh.exists():  # made when its library is installed
            shipped = json.loads((FIXTURES / made / "config.json").read_text())
            assert {k: shipped[k] for k in keys} == {k: json.loads(fresh.read_text())[k] for k in keys}


def checkpoint_pairs(regenerated: Path) -> list[tuple[Path, Path]]:
    """(shipped, regenerated) for every checkpoint, after checking that both folders hold the same ones."""
    pairs = []
    skipped = not_compared(regenerated)
    for folder in FOLDERS:
        shipped = [p.relative_to(FIXTURES / folder) for p in find_checkpoints(FIXTURES / folder)]
        shipped = [p for p in shipped if not any(f"{folder}/{p.as_posix()}".startswith(made) for made in skipped)]
        fresh = [p.relative_to(regenerated / folder) for p in find_checkpoints(regenerated / folder)]
        fresh = [p for p in fresh if not any(f"{folder}/{p.as_posix()}".startswith(made) for made in skipped)]
        assert shipped == fresh, folder
        pairs += [(FIXTURES / folder / relative, regenerated / folder / relative) for relative in shipped]
    return pairs


def test_regenerated_samples_are_identical(regenerated: Path) -> None:
    # drawn from a seeded numpy generator, not trained: no kernel rounds them, so they must match bit for bit
    for name in ("sample-original.npy", "sample-shifted.npy", "labels.npy"):
        np.testing.assert_array_equal(
            np.load(FIXTURES / "recompute" / name), np.load(regenerated / "recompute" / name), err_msg=name
        )


def test_regenerated_checkpoints_match_the_checked_in_ones(regenerated: Path) -> None:
    for shipped, fresh in checkpoint_pairs(regenerated):
        label = shipped.relative_to(FIXTURES)
        ours = all_tensors(open_checkpoint(shipped).root)
        theirs = all_tensors(open_checkpoint(fresh).root)
        assert list(ours) == list(theirs), label
        assert len(ours) >= 8, label
        for name, ref in ours.items():
            other = theirs[name]
            where = f"{label}{name}"
            assert (ref.dtype, ref.shape, ref.no_data) == (other.dtype, other.shape, other.no_data), where
            if ref.no_data is not None:  # recorded without values (BN018): nothing more to compare
                continue
            if ref.dtype in RTOL and label.as_posix() in CHAOTIC:
                np.testing.assert_array_equal(
                    non_finite_pattern(ref.read()), non_finite_pattern(other.read()), err_msg=where
                )
            elif ref.dtype in RTOL:
                # NaN matches NaN and an infinity matches the same infinity; both are findings the fixtures carry
                np.testing.assert_allclose(ref.read(), other.read(), rtol=RTOL[ref.dtype], atol=ATOL, err_msg=where)
            else:  # integers (num_batches_tracked, the int stats of BN004) and bools are counted, never rounded
                np.testing.assert_array_equal(ref.read(), other.read(), err_msg=where)


def test_regenerated_checkpoints_give_the_same_findings(regenerated: Path) -> None:
    # the rounding noise allowed above must never decide a verdict: the same rule codes on both copies
    for shipped, fresh in checkpoint_pairs(regenerated):
        ours = inspect_file(shipped)
        theirs = inspect_file(fresh)
        assert (ours.error, theirs.error) == (None, None), shipped
        assert {f.code for f in ours.findings} == {f.code for f in theirs.findings}, shipped.relative_to(FIXTURES)
