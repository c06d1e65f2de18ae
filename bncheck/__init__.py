"""bncheck: inspect and validate the BatchNorm running statistics stored in checkpoints.

>>> report = bncheck.inspect("model.pt")
>>> report.ok
"""

from bncheck.api import inspect
from bncheck.checks import Thresholds
from bncheck.report import FileReport, Finding, LayerInfo, Report, Severity

__version__ = "0.1.0"

__all__ = ["FileReport", "Finding", "LayerInfo", "Report", "Severity", "Thresholds", "__version__", "inspect"]
