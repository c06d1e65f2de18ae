"""One exception family: every error that reaches a report has its own stable code."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

from bncheck import errors
from bncheck.errors import BncheckError, first_line


def subclasses() -> list[type[BncheckError]]:
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, BncheckError) and value is not BncheckError
    ]


def test_every_error_has_its_own_code() -> None:
    codes = [cls.code for cls in subclasses()]
    assert len(codes) >= 12
    assert len(set(codes)) == len(codes)
    assert all(code and code == code.lower() and " " not in code for code in codes)
    assert not hasattr(BncheckError, "code")


def test_no_module_raises_the_bare_base_class() -> None:
    offenders = []
    for path in sorted((ROOT / "bncheck").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id == "BncheckError":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_module_defines_an_error_outside_errors_py() -> None:
    outside = []
    for path in sorted((ROOT / "bncheck").rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and base.id.endswith("Error") for base in node.bases
            ):
                outside.append(f"{Path(path).relative_to(ROOT)}:{node.name}")
    assert outside == []


def test_first_line_is_one_line_with_the_type() -> None:
    assert first_line(RuntimeError("size mismatch\n  at layer 1\n")) == "RuntimeError: size mismatch"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("  \n")) == "ValueError"
