"""The checked-in fixtures are exactly what the seeded generator makes (tensors compared; bytes embed file names)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import FIXTURES

from bncheck.loaders import find_checkpoints, open_checkpoint
from bncheck.loaders.interface import TensorRef
from bncheck.loaders.restricted_pickle import Placeholder


def all_tensors(node: object, path: str = "", out: dict[str, TensorRef] | None = None) -> dict[str, TensorRef]:
    out = {} if out is None else out
    if isinstance(node, TensorRef):
        out[path] = node
    elif isinstance(node, dict):
        for key, value in node.items():
            all_tensors(value, f"{path}/{key}", out)
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            all_tensors(value, f"{path}/{index}", out)
    elif isinstance(node, Placeholder):
        all_tensors([node.args, node.kwargs, node.state, node.items, node.dictitems], path, out)
    return out


def test_regenerated_fixtures_match_the_checked_in_ones(tmp_path: Path) -> None:
    sys.path.insert(0, str(FIXTURES))
    import make_fixtures

    make_fixtures.make_all(tmp_path)
    for name in ("sample-original.npy", "sample-shifted.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(FIXTURES / "recompute" / name), np.load(tmp_path / "recompute" / name))
    for folder in ("good", "bad", "recompute"):
        shipped = [p.relative_to(FIXTURES / folder) for p in find_checkpoints(FIXTURES / folder)]
        fresh = [p.relative_to(tmp_path / folder) for p in find_checkpoints(tmp_path / folder)]
        assert shipped == fresh
        for relative in shipped:
            ours = all_tensors(open_checkpoint(FIXTURES / folder / relative).root)
            theirs = all_tensors(open_checkpoint(tmp_path / folder / relative).root)
            assert list(ours) == list(theirs), relative
            assert len(ours) >= 8, relative
            for name, ref in ours.items():
                other = theirs[name]
                assert (ref.dtype, ref.shape) == (other.dtype, other.shape), f"{relative}{name}"
                np.testing.assert_array_equal(ref.read(), other.read(), err_msg=f"{relative}{name}")
