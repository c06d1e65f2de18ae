"""A hostile corpus built here: every payload would create a marker file if unpickled. bncheck must never run
one, must name the dangerous global (at least whatever picklescan flags), and must still check the real layers."""

from __future__ import annotations

import _compat_pickle
import builtins
import functools
import importlib
import operator
import os
import pickle
import runpy
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from picklescan.scanner import SafetyLevel, scan_file_path
from torch import nn


class Reduce:
    """Unpickles as ``func(*args)``; func and args may themselves be Reduce objects (call chains)."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args: object) -> object:  # pickle insists that a reduce callable be callable
        raise AssertionError("never called while pickling")


def shell(marker: Path) -> str:
    return f"touch {marker}"


def python_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


PAYLOADS: dict[str, Callable[[Path], object]] = {
    "os.system": lambda m: Reduce(os.system, shell(m)),
    "subprocess.check_call": lambda m: Reduce(subprocess.check_call, ["touch", str(m)]),
    "builtins.exec": lambda m: Reduce(builtins.exec, python_code(m)),
    "builtins.eval": lambda m: Reduce(builtins.eval, python_code(m)),
    "builtins.getattr": lambda m: Reduce(
        Reduce(builtins.getattr, Reduce(importlib.import_module, "os"), "system"), shell(m)
    ),
    "operator.attrgetter": lambda m: Reduce(
        Reduce(Reduce(operator.attrgetter, "system"), Reduce(importlib.import_module, "os")), shell(m)
    ),
    "operator.methodcaller": lambda m: Reduce(
        Reduce(operator.methodcaller, "system", shell(m)), Reduce(importlib.import_module, "os")
    ),
    "functools.partial": lambda m: Reduce(Reduce(functools.partial, os.system, shell(m))),
    "runpy": lambda m: Reduce(runpy.run_path, str(m.with_suffix(".py"))),
    "nested pickle.loads": lambda m: Reduce(pickle.loads, pickle.dumps(Reduce(os.system, shell(m)), protocol=2)),
}


def healthy_model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 5), nn.BatchNorm1d(5))
    model(torch.randn(16, 4))
    return model.state_dict()


def inst_pickle(marker: Path) -> bytes:
    return f"(S'touch {marker}'\nios\nsystem\n.".encode()


def write_runpy_target(marker: Path) -> None:
    marker.with_suffix(".py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def place(where: str, payload: object, folder: Path) -> tuple[Path, int]:
    """Write a checkpoint holding ``payload`` at ``where``; return it and how many real BatchNorm layers it has."""
    state = healthy_model_state()
    if where == "zip state dict":
        path = folder / "model.pt"
        torch.save({"state_dict": state, "extra": payload}, path)
        return path, 2
    if where == "lightning hyper-parameters":
        path = folder / "last.ckpt"
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "epoch": 3,
                "hyper_parameters": {"callback": payload, "lr": 0.1},
            },
            path,
        )
        return path, 2
    if where == "legacy file":
        path = folder / "legacy.pt"
        torch.save({"model": state, "extra": payload}, path, _use_new_zipfile_serialization=False)
        return path, 2
    if where == "torchscript constants":
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        scripted = folder / "scripted-clean.pt"
        torch.jit.script(model).save(str(scripted))
        path = folder / "scripted.pt"
        with zipfile.ZipFile(scripted) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("constants.pkl"):
                    data = pickle.dumps(payload, protocol=2)
                dst.writestr(info.filename, data)
        return path, 1
    if where == "bare pickle in zip":
        path = folder / "bare.pt"
        torch.save(healthy_model_state(), path)
        rewritten = folder / "bare-hostile.pt"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(rewritten, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                dst.writestr(
                    info.filename, pickle.dumps(payload, protocol=2) if info.filename.endswith("data.pkl") else data
                )
        return rewritten, 0
    raise AssertionError(where)


PLACES = ["zip state dict", "lightning hyper-parameters", "legacy file", "torchscript constants", "bare pickle in zip"]


def py3_name(module: str, name: str) -> str:
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_hostile_corpus(cli, tmp_path: Path, kind: str, where: str) -> None:
    marker = tmp_path / "marker"
    write_runpy_target(marker)
    armed = tmp_path / "armed"
    write_runpy_target(armed)
    # the payload is live: plain pickle runs it
    pickle.loads(pickle.dumps(PAYLOADS[kind](armed), protocol=2))
    assert armed.exists(), f"{kind} payload is not live"

    path, layers = place(where, PAYLOADS[kind](marker), tmp_path)
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    (file,) = result.json()["files"]
    assert file["error"] is None, file["error"]
    bn101 = [f for f in file["findings"] if f["code"] == "BN101"]
    assert len(bn101) == 1
    assert len(file["layers"]) == layers  # the real layers are still found and checked
    assert result.exit_code == 1
    # at least everything picklescan calls dangerous is named
    scan = scan_file_path(str(path))
    dangerous = {py3_name(g.module, g.name) for g in scan.globals if g.safety == SafetyLevel.Dangerous}
    named = bn101[0]["message"].removeprefix("pickle names ").split("; ")[0].split(", ")
    assert dangerous <= set(named), f"picklescan flags {dangerous - set(named)} that bncheck does not"


def test_inst_opcode_in_a_legacy_style_bare_pickle_is_recorded_not_run(cli, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "inst.pt"
    torch.save(healthy_model_state(), tmp_path / "clean.pt")
    with zipfile.ZipFile(tmp_path / "clean.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, inst_pickle(marker) if info.filename.endswith("data.pkl") else src.read(info))
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    (file,) = result.json()["files"]
    assert [f["message"] for f in file["findings"]] == ["pickle names os.system; bncheck did not run it"]
