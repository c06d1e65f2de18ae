"""A pytest helper: assert that a model's or a checkpoint's BatchNorm statistics are healthy.

from bncheck.testing import assert_batchnorm_healthy

def test_model_is_shippable(trained_model):
    assert_batchnorm_healthy(trained_model)           # a live nn.Module
    assert_batchnorm_healthy("checkpoints/last.pt")   # or any path bncheck inspect takes
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from bncheck.config import Options
from bncheck.render.concise import render_concise
from bncheck.report import Report, Severity

if TYPE_CHECKING:
    import torch


def assert_batchnorm_healthy(
    model_or_path: torch.nn.Module | str | os.PathLike[str],
    *,
    fail_on: str | Severity = Severity.ERROR,
    options: Options | None = None,
) -> Report:
    """Check a live module (every static rule) or a checkpoint path (as ``bncheck inspect``), and raise
    ``AssertionError`` when a finding is at or above ``fail_on`` or the path cannot be read. The message is the
    concise report: one line per finding, ``where: CODE severity message``, then the summary line. Returns the
    report when the check passes."""
    options = dataclasses.replace(options or Options(), fail_on=Severity(fail_on))
    if isinstance(model_or_path, str | os.PathLike):
        from bncheck.api import inspect

        report = inspect(model_or_path, options=options)
    else:
        from bncheck import __version__
        from bncheck.live import inspect_module

        report = Report(
            files=(inspect_module(model_or_path, options=options),), fail_on=options.fail_on, tool_version=__version__
        )
    if not report.ok:
        raise AssertionError("BatchNorm statistics are not healthy:\n" + render_concise(report))
    return report
