"""The ``--json`` document (schema_version 1).

Keys never depend on options or verbosity; there is no timestamp, so the same input gives the same document.
Non-finite numbers are written as the strings "nan", "inf" and "-inf", and ``allow_nan=False`` makes any that slip
through fail loudly instead of producing invalid JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bncheck.report import (
    CONFIG_FIELDS,
    ConfigInfo,
    DiffReport,
    FileError,
    FileReport,
    Finding,
    LayerConfig,
    LayerInfo,
    ModelConfig,
    RecomputeInfo,
    Report,
    Setting,
    Severity,
    Summary,
)

SCHEMA_VERSION = 1


def _number(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _summary(summary: Summary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {
        "min": _number(summary.min),
        "max": _number(summary.max),
        "mean": _number(summary.mean),
        "nonfinite": summary.nonfinite,
    }


def _setting(setting: Setting | None) -> dict[str, Any] | None:
    if setting is None:
        return None
    value = setting.value
    return {"value": value if isinstance(value, bool) else _number(value), "source": setting.source}


def _configuration(config: LayerConfig) -> dict[str, Any]:
    """Every setting's key, always: null when the file does not record it."""
    return {name: _setting(getattr(config, name)) for name in CONFIG_FIELDS}


def _model_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "file": config.file,
        "path": config.path,
        "model_type": config.model_type,
        "momentum": _setting(config.settings.momentum),
        "eps": _setting(config.settings.eps),
    }


def _layer(layer: LayerInfo) -> dict[str, Any]:
    return {
        "name": layer.name,
        "source": layer.source,
        "averaged": layer.averaged,
        "kind": layer.kind,
        "kind_inferred": layer.kind_inferred,
        "num_features": layer.num_features,
        "dtype": layer.dtype,
        "num_batches_tracked": layer.num_batches_tracked,
        "running_mean": _summary(layer.running_mean),
        "running_var": _summary(layer.running_var),
        "codes": list(layer.codes),
        "configuration": _configuration(layer.configuration),
    }


def _finding(finding: Finding) -> dict[str, Any]:
    return {
        "code": finding.code,
        "severity": finding.severity.value,
        "layer": finding.layer,
        "source": finding.source,
        "tensor": finding.tensor,
        "channels": list(finding.channels),
        "channel_count": finding.channel_count,
        "message": finding.message,
        "hint": finding.hint,
    }


def _recompute(info: RecomputeInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "model": info.model,
        "data": info.data,
        "mode": info.mode,
        "estimator": info.estimator,
        "variance_convention": info.variance_convention,
        "source": info.source,
        "prefix": info.prefix,
        "samples": info.samples,
        "batches": info.batches,
        "batches_skipped": info.batches_skipped,
        "too_few_samples": info.too_few_samples,
        "layers": [
            {
                "name": row.name,
                "source": row.source,
                "module": row.module,
                "samples": row.samples,
                "mean_shift_median": _number(row.mean_shift_median),
                "mean_shift_worst": _number(row.mean_shift_worst),
                "log_var_ratio_median": _number(row.log_var_ratio_median),
                "log_var_ratio_worst": _number(row.log_var_ratio_worst),
                "stale": row.stale,
                "silenced": row.silenced,
            }
            for row in info.layers
        ],
        "unmeasured": [{"name": u.name, "module": u.module, "reason": u.reason} for u in info.unmeasured],
        "notes": list(info.notes),
    }


def _error(error: FileError | None) -> dict[str, str] | None:
    return None if error is None else {"code": error.code, "message": error.message}


def _file(file: FileReport) -> dict[str, Any]:
    return {
        "path": file.path,
        "format": file.format,
        "size_bytes": file.size_bytes,
        "error": _error(file.error),
        "notes": list(file.notes),
        "layers": [_layer(layer) for layer in file.layers],
        "findings": [_finding(finding) for finding in file.findings],
        "recompute": _recompute(file.recompute),
        "recompute_error": _error(file.recompute_error),
        "model_configs": [_model_config(config) for config in file.model_configs],
    }


def _config(config: ConfigInfo | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {
        "path": config.path,
        "discovered": config.discovered,
        "settings": dict(config.settings),
        "notes": list(config.notes),
        "overruled": list(config.overruled),
    }


def report_document(report: Report) -> dict[str, Any]:
    """The JSON document as Python data."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "bncheck", "version": report.tool_version},
        "ok": report.ok,
        "fail_on": report.fail_on.value,
        "config": _config(report.config),
        "files": [_file(file) for file in report.files],
        "summary": {
            "files": len(report.files),
            "unreadable": sum(1 for f in report.files if f.error is not None),
            "recompute_failed": sum(1 for f in report.files if f.recompute_error is not None),
            "layers": report.layer_count,
            "errors": report.count(Severity.ERROR),
            "warnings": report.count(Severity.WARNING),
            "infos": report.count(Severity.INFO),
        },
    }


def dump(document: Any, *, pretty: bool) -> str:
    """JSON text of a document: indented for people, or on one line (about four times faster to write)."""
    if pretty:
        return json.dumps(document, indent=2, allow_nan=False)
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def render_json(report: Report, *, pretty: bool = True) -> str:
    return dump(report_document(report), pretty=pretty)


def render_diff_json(diff: DiffReport, *, pretty: bool = True) -> str:
    """``bncheck diff --json``: its own document kind, versioned like the report."""
    document = {
        "schema_version": SCHEMA_VERSION,
        "kind": "diff",
        "tool": {"name": "bncheck", "version": diff.tool_version},
        "a": {"path": diff.path_a, "format": diff.format_a, "source": diff.source_a},
        "b": {"path": diff.path_b, "format": diff.format_b, "source": diff.source_b},
        "error": _error(diff.error),
        "differs": diff.differs,
        "only_in_a": list(diff.only_in_a),
        "only_in_b": list(diff.only_in_b),
        "channel_changes": [{"layer": name, "a": ca, "b": cb} for name, ca, cb in diff.channel_changes],
        "folded": [
            {
                "name_a": layer.name_a,
                "feeder_a": layer.feeder_a,
                "weight_b": layer.weight_b,
                "bias_b": layer.bias_b,
                "faithful": layer.faithful,
            }
            for layer in diff.folded
        ],
        "notes": list(diff.notes),
        "layers": [
            {
                "name_a": row.name_a,
                "name_b": row.name_b,
                "channels": row.channels,
                "mean_shift_median": _number(row.mean_shift_median),
                "mean_shift_worst": _number(row.mean_shift_worst),
                "log_var_ratio_median": _number(row.log_var_ratio_median),
                "log_var_ratio_worst": _number(row.log_var_ratio_worst),
                "drifted": row.drifted,
                "reasons": list(row.reasons),
            }
            for row in diff.layers
        ],
    }
    return dump(document, pretty=pretty)
