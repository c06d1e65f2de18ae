"""Checks inside a training loop: callbacks for Lightning (``bncheck.integrations.lightning``) and the Hugging Face
Trainer (``bncheck.integrations.transformers``). Both check the live model when a checkpoint is about to be saved
and when training ends, say what they found, and stop training before a checkpoint whose statistics fail the check
is written. This module holds what they share; each framework is imported only by its own module."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from bncheck.config import Options, load_settings
from bncheck.errors import BatchNormCheckError
from bncheck.render.concise import render_concise
from bncheck.report import Report, Severity

if TYPE_CHECKING:
    import torch

LOGGER = logging.getLogger("bncheck")
__all__ = ["BatchNormCheckError", "TrainingCheck", "counts"]


class TrainingCheck:
    """The check a callback runs: the live model against the same rules, selection and thresholds as the command
    line (a pyproject.toml's [tool.bncheck], unless ``options`` are given). ``fail_on`` None only reports."""

    def __init__(self, *, fail_on: str | Severity | None = Severity.ERROR, options: Options | None = None) -> None:
        self.options = options if options is not None else load_settings()
        self.fail_on = None if fail_on is None else Severity(fail_on)
        if self.fail_on is not None:
            self.options = dataclasses.replace(self.options, fail_on=self.fail_on)

    def inspect(self, model: torch.nn.Module, when: str, *, say: bool = True) -> Report:
        """Check ``model``; with ``say``, log its findings (one warning with a line each)."""
        from bncheck import __version__
        from bncheck.live import inspect_module

        file = inspect_module(model, options=self.options)
        report = Report(files=(file,), fail_on=self.options.fail_on, tool_version=__version__)
        if say and file.findings:
            LOGGER.warning("bncheck %s:\n%s", when, render_concise(report))
        return report

    def enforce(self, report: Report, when: str) -> None:
        """Raise BatchNormCheckError when a finding is at or above ``fail_on``."""
        if self.fail_on is not None and report.failed:
            raise BatchNormCheckError(
                f"bncheck stopped training {when}: the BatchNorm statistics fail the check "
                f"(fail_on={self.fail_on.value})\n{render_concise(report)}"
            )


def counts(report: Report) -> dict[str, float]:
    """The findings by severity, as metrics for a training logger."""
    return {f"bncheck/{severity.value}s": float(report.count(severity)) for severity in Severity}
