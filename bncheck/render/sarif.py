"""SARIF 2.1.0, as GitHub code scanning ingests it: one rule per code with its help text, one result per finding
located at the checkpoint file, with the layer as its logical location. Unreadable files become tool execution
notifications, so a run that could not check everything is marked unsuccessful."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from bncheck.render.json import dump
from bncheck.report import FileReport, Finding, Report, RuleInfo, Severity

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def _rule_descriptor(rule: RuleInfo) -> dict[str, Any]:
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.paragraphs[0].removeprefix("What: ")},
        "help": {"text": "\n\n".join(rule.paragraphs), "markdown": "\n\n".join(rule.paragraphs)},
        "defaultConfiguration": {"level": LEVEL[rule.severity]},
        "properties": {"tags": ["batchnorm", "checkpoint"]},
    }


def _location(file: FileReport, finding: Finding | None = None) -> dict[str, Any]:
    location: dict[str, Any] = {
        "physicalLocation": {"artifactLocation": {"uri": file.path}, "region": {"startLine": 1}}
    }
    if finding is not None and finding.layer is not None:
        qualified = f"{finding.source}:{finding.layer}" if finding.source else finding.layer
        location["logicalLocations"] = [
            {"name": finding.layer or "(root)", "fullyQualifiedName": qualified, "kind": "member"}
        ]
    return location


def _result(file: FileReport, finding: Finding, index: Mapping[str, int]) -> dict[str, Any]:
    text = finding.message
    if finding.layer is not None:
        text = f"{finding.layer or '(root)'}: {text}"
    if finding.channel_count:
        shown = ", ".join(map(str, finding.channels[:16]))
        text += f" (channels {shown}{', ...' if finding.channel_count > 16 else ''}; {finding.channel_count} in all)"
    identity = "|".join([finding.code, file.path, finding.source or "", finding.layer or "", finding.tensor or ""])
    return {
        "ruleId": finding.code,
        "ruleIndex": index[finding.code],
        "level": LEVEL[finding.severity],
        "message": {"text": f"{text}. Fix: {finding.hint}"},
        "locations": [_location(file, finding)],
        "partialFingerprints": {"bncheckFinding/v1": hashlib.sha256(identity.encode()).hexdigest()},
    }


def render_sarif(report: Report, *, pretty: bool = True) -> str:
    index = {rule.code: i for i, rule in enumerate(report.rules)}
    results = [_result(file, finding, index) for file in report.files for finding in file.findings]
    notifications = [
        {
            "level": "error",
            "message": {"text": f"{file.path}: {error.message}"},
            "locations": [_location(file)],
            "descriptor": {"id": error.code},
        }
        for file in report.files
        for error in file.errors
    ]
    config = report.config
    settings = [{"level": "note", "message": {"text": note}} for note in (config.notes if config else ())]
    settings += [{"level": "warning", "message": {"text": note}} for note in (config.overruled if config else ())]
    document = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "bncheck",
                        "version": report.tool_version,
                        "semanticVersion": report.tool_version,
                        "rules": [_rule_descriptor(rule) for rule in report.rules],
                    }
                },
                "invocations": [
                    {
                        "executionSuccessful": not report.unreadable,
                        "toolExecutionNotifications": notifications,
                        "toolConfigurationNotifications": settings,
                    }
                ],
                "results": results,
            }
        ],
    }
    return dump(document, pretty=pretty)
