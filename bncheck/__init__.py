"""bncheck: inspect and validate the BatchNorm running statistics stored in checkpoints.

>>> report = bncheck.inspect("model.pt")
>>> report.ok
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bncheck.api import inspect
    from bncheck.checks import Thresholds
    from bncheck.config import Options, RuleSelection
    from bncheck.live import inspect_module
    from bncheck.loaders import find_checkpoints
    from bncheck.recalibrate import recalibrate
    from bncheck.recompute import RecomputeRequest
    from bncheck.report import FileReport, Finding, LayerInfo, Report, Severity

__version__ = "0.1.0"

__all__ = [
    "FileReport",
    "Finding",
    "LayerInfo",
    "Options",
    "RecomputeRequest",
    "Report",
    "RuleSelection",
    "Severity",
    "Thresholds",
    "__version__",
    "find_checkpoints",
    "inspect",
    "inspect_module",
    "recalibrate",
]

# The public names are imported on first use, so that `bncheck --version` and `--help` do not load numpy and the
# readers.
_HOME = {
    "inspect": "bncheck.api",
    "inspect_module": "bncheck.live",
    "find_checkpoints": "bncheck.loaders",
    "recalibrate": "bncheck.recalibrate",
    "Thresholds": "bncheck.checks",
    "Options": "bncheck.config",
    "RuleSelection": "bncheck.config",
    "RecomputeRequest": "bncheck.recompute",
    "FileReport": "bncheck.report",
    "Finding": "bncheck.report",
    "LayerInfo": "bncheck.report",
    "Report": "bncheck.report",
    "Severity": "bncheck.report",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'bncheck' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
