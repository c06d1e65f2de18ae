"""recalibrate --validate: the model scored on labelled data with the stored and with the recomputed statistics,
compared with an evaluation done here with torch alone, and the copy refused when recalibration makes it worse."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_process

from bncheck.errors import ModelError, WriteError
from bncheck.recalibrate import recalibrate_validated
from bncheck.recompute import RecomputeRequest
from bncheck.validate import Validation, ValidationRequest, validate_statistics

R = FIXTURES / "recompute"
MODEL = f"{R / 'models.py'}:tabular_mlp"
SHIFTED = R / "sample-shifted.npy"
STALE = R / "stale-untracked-finetune.safetensors"
FROZEN = R / "frozen-bn-finetune.ckpt"
HOLDOUT = f"{R / 'models.py'}:shifted_holdout"
# recalibration reads the first 512 shifted samples; validation the 488 after them
RECALIBRATE = ("--model", MODEL, "--data", SHIFTED, "--max-samples", "512")


def held_out() -> tuple[np.ndarray, np.ndarray]:
    return np.load(SHIFTED)[512:], np.load(R / "labels.npy")[512:]


@pytest.fixture
def vdata(tmp_path: Path) -> Path:
    x, labels = held_out()
    path = tmp_path / "validation.npz"
    np.savez(path, x=x, labels=labels)
    return path


def model_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    sys.path.insert(0, str(R))
    from models import tabular_mlp

    model = tabular_mlp()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


def outputs_of(state: dict[str, torch.Tensor]) -> torch.Tensor:
    x, _ = held_out()
    with torch.no_grad():
        return model_with(state)(torch.from_numpy(x))


def accuracy(state: dict[str, torch.Tensor]) -> float:
    """The held-out accuracy, computed here: the count of right answers over the count of samples."""
    _, labels = held_out()
    right = int((outputs_of(state).argmax(1) == torch.from_numpy(labels)).sum())
    return right / len(labels)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)["state_dict"]


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "bncheck-tmp" in p.name]


def test_validation_on_the_stale_fixture_improves_and_the_copy_is_written(cli, tmp_path: Path, vdata: Path) -> None:
    out = tmp_path / "fixed.safetensors"
    result = cli("recalibrate", STALE, *RECALIBRATE, "-o", out, "--validate", vdata)
    assert result.exit_code == 0, result.stderr
    before, after = accuracy(load_state(STALE)), accuracy(load_state(out))
    assert after > before + 0.02
    line = f"validation accuracy on 488 samples: stored {before:.3f}, recalibrated {after:.3f} ({after - before:+.3f})"
    assert result.stderr.splitlines()[0] == f"bncheck: {line}"
    assert line in " ".join(result.stdout.split())  # the report's note


def test_the_numbers_are_those_of_an_independent_evaluation(tmp_path: Path, vdata: Path) -> None:
    request = RecomputeRequest(model=MODEL, data=str(SHIFTED), max_samples=512)
    out = tmp_path / "fixed.safetensors"
    report, validation = recalibrate_validated(STALE, out, request, validate=str(vdata))
    assert validation == Validation(
        metric="accuracy",
        higher_is_better=True,
        samples=488,
        stored=accuracy(load_state(STALE)),
        recalibrated=accuracy(load_state(out)),
    )
    assert validation.summary() in report.notes


def test_a_data_callable_gives_the_same_numbers_as_the_tensor_file(tmp_path: Path, vdata: Path) -> None:
    request = RecomputeRequest(model=MODEL, data=str(SHIFTED), max_samples=512)
    _, from_file = recalibrate_validated(STALE, tmp_path / "a.safetensors", request, validate=str(vdata))
    _, from_loader = recalibrate_validated(STALE, tmp_path / "b.safetensors", request, validate=HOLDOUT)
    assert from_file == from_loader


def test_a_frozen_bn_finetune_is_refused_and_written_only_with_allow_worse(cli, tmp_path: Path, vdata: Path) -> None:
    before = accuracy(load_state(FROZEN))
    out = tmp_path / "recalibrated.ckpt"
    refused = cli("recalibrate", FROZEN, *RECALIBRATE, "-o", out, "--validate", vdata)
    assert refused.exit_code == 2
    (line,) = refused.stderr.splitlines()
    assert f"stored {before:.3f}, recalibrated " in line and "nothing was written" in line and "--allow-worse" in line
    assert not out.exists() and temp_files(tmp_path) == []
    # --force replaces an existing output; it does not override the validation
    out.write_bytes(b"keep me")
    forced = cli("recalibrate", FROZEN, *RECALIBRATE, "-o", out, "--validate", vdata, "--force")
    assert forced.exit_code == 2 and out.read_bytes() == b"keep me"
    allowed = cli("recalibrate", FROZEN, *RECALIBRATE, "-o", out, "--validate", vdata, "--force", "--allow-worse")
    assert allowed.exit_code == 0, allowed.stderr
    after = accuracy(load_state(out))
    assert after < before
    assert f"stored {before:.3f}, recalibrated {after:.3f} ({after - before:+.3f})" in allowed.stderr
    assert f"recalibrated {after:.3f}" in line  # the refusal named the score the written copy has


def test_the_library_refuses_with_both_numbers_and_writes_nothing(tmp_path: Path) -> None:
    request = RecomputeRequest(model=MODEL, data=str(SHIFTED), max_samples=512)
    _, validation = recalibrate_validated(
        FROZEN, tmp_path / "allowed.ckpt", request, validate=HOLDOUT, allow_worse=True
    )
    assert validation is not None and validation.worse
    assert validation.stored == accuracy(load_state(FROZEN))
    with pytest.raises(WriteError) as refused:
        recalibrate_validated(FROZEN, tmp_path / "out.ckpt", request, validate=HOLDOUT)
    assert validation.summary() in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allowed.ckpt"]


LOADERS = """
import numpy as np
import torch

R = __import__("pathlib").Path(%r)
X = torch.from_numpy(np.load(R / "sample-shifted.npy"))
Y = torch.from_numpy(np.load(R / "labels.npy"))

def train_dicts():
    for start in range(0, 512, 64):
        yield {"features": X[start : start + 64], "id": torch.arange(64)}

def held_out_dicts():
    for start in range(512, 1000, 64):
        yield {"features": X[start : start + 64], "label": Y[start : start + 64], "id": torch.arange(64)}

def labels_first():
    for start in range(512, 1000, 100):
        yield Y[start : start + 100], X[start : start + 100]
"""


def test_inputs_and_target_of_dict_and_tuple_batches(tmp_path: Path, vdata: Path) -> None:
    (tmp_path / "loaders.py").write_text(LOADERS % str(R))
    loaders = tmp_path / "loaders.py"
    request = RecomputeRequest(model=MODEL, data=f"{loaders}:train_dicts", inputs=("features",))
    _, expected = recalibrate_validated(
        STALE,
        tmp_path / "a.safetensors",
        dataclasses.replace(request, data=str(SHIFTED), inputs=(), max_samples=512),
        validate=str(vdata),
    )
    # --inputs chooses the model's inputs from VDATA's batches too, by the names VDATA gives them
    dicts = ValidationRequest(data=f"{loaders}:held_out_dicts", target="label")
    _, from_dicts = recalibrate_validated(STALE, tmp_path / "b.safetensors", request, validate=dicts)
    assert from_dicts == expected
    # a tuple's target need not be last; other batch sizes give the same numbers; the library can give VDATA
    # inputs of its own (here none: what is left of the tuple)
    first = ValidationRequest(data=f"{loaders}:labels_first", target="0", inputs=())
    _, from_tuples = recalibrate_validated(STALE, tmp_path / "c.safetensors", request, validate=first)
    assert from_tuples == expected
    # without --inputs, a dict's other keys become keyword arguments, as for DATA: the model cannot take them
    loose = dataclasses.replace(request, data=str(SHIFTED), inputs=(), max_samples=512)
    with pytest.raises(ModelError, match="choose the model's inputs of each batch with --inputs"):
        recalibrate_validated(STALE, tmp_path / "d.safetensors", loose, validate=dicts)


def test_floating_targets_are_scored_by_mean_squared_error(cli, tmp_path: Path) -> None:
    x, labels = held_out()
    targets = np.eye(2, dtype=np.float32)[labels] * 4 - 2  # a regression target: the logits a confident model gives
    vdata = tmp_path / "regression.safetensors"
    from safetensors.numpy import save_file

    save_file({"inputs": x, "y": targets}, vdata)
    out = tmp_path / "fixed.safetensors"
    result = cli("recalibrate", STALE, *RECALIBRATE, "-o", out, "--validate", vdata, "--allow-worse")
    assert result.exit_code == 0, result.stderr

    def mse(state: dict[str, torch.Tensor]) -> float:
        return float(((outputs_of(state).double() - torch.from_numpy(targets).double()) ** 2).mean())

    before, after = mse(load_state(STALE)), mse(load_state(out))
    assert after < before
    expected = (
        f"validation mean squared error on 488 samples: stored {before:.4g}, recalibrated {after:.4g} "
        f"({after - before:+.4g}, lower is better)"
    )
    assert result.stderr.splitlines()[0] == f"bncheck: {expected}"


METRIC = """
import torch

def error_rate(outputs, targets):
    return (outputs.argmax(1) != targets).double().mean()

def broken(outputs, targets):
    return 1 / 0

def words(outputs, targets):
    return "good"
"""


def test_a_metric_callable_and_its_direction(cli, tmp_path: Path, vdata: Path) -> None:
    (tmp_path / "metrics.py").write_text(METRIC)
    metric = f"{tmp_path / 'metrics.py'}:error_rate"
    out = tmp_path / "fixed.safetensors"
    lower = cli(
        "recalibrate", STALE, *RECALIBRATE, "-o", out, "--validate", vdata, "--metric", metric, "--metric-mode", "min"
    )
    assert lower.exit_code == 0, lower.stderr
    before, after = 1 - accuracy(load_state(STALE)), 1 - accuracy(load_state(out))
    assert f"stored {before:.4g}, recalibrated {after:.4g} ({after - before:+.4g}, lower is better)" in lower.stderr
    out.unlink()
    # read as higher-is-better (the default), the same fall in error rate is a worse score: refused
    higher = cli("recalibrate", STALE, *RECALIBRATE, "-o", out, "--validate", vdata, "--metric", metric)
    assert higher.exit_code == 2 and "higher is better" in higher.stderr and not out.exists()


def test_the_model_is_left_as_found() -> None:
    from safetensors.torch import load_file

    model = model_with(load_file(STALE)).train()
    model[3].eval()  # a mix of flags, as a user's model may have
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    shifted = {"1": {"running_mean": torch.zeros(64), "running_var": torch.full((64,), 9.0)}}
    validation = validate_statistics(model, ValidationRequest(data=HOLDOUT), shifted)
    assert validation.stored != validation.recalibrated
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def write_npz(folder: Path, name: str, **arrays: np.ndarray) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


CALLABLES = """
import torch

def uneven():
    yield torch.zeros(64, 20), torch.zeros(60, dtype=torch.int64)

def inputs_only():
    yield (torch.zeros(64, 20),)
"""


def error_cases(folder: Path) -> dict[str, tuple[list[str], str]]:
    x, labels = held_out()
    (folder / "loaders.py").write_text(CALLABLES)
    (folder / "metrics.py").write_text(METRIC)
    return {
        "missing file": (["--validate", str(folder / "nowhere.npz")], "validation data: no such file: "),
        "fewer targets than inputs": (
            ["--validate", str(write_npz(folder, "short.npz", x=x, labels=labels[:400]))],
            "validation data: data tensors disagree on the number of samples: {'x': 488, 'labels': 400}",
        ),
        "a batch with fewer targets": (
            ["--validate", f"{folder / 'loaders.py'}:uneven"],
            "loaders.py:uneven holds 64 inputs but 60 targets",
        ),
        "inputs only (tensor file)": (["--validate", str(SHIFTED)], "holds inputs only: validation needs targets"),
        "inputs only (callable)": (["--validate", f"{folder / 'loaders.py'}:inputs_only"], "validation needs (inputs"),
        "no target name": (
            ["--validate", str(write_npz(folder, "anon.npz", a=x, b=labels))],
            "has no target named labels, label, targets, target, y (it has a, b); name it with --validate-target",
        ),
        "unknown target": (
            ["--validate", str(write_npz(folder, "named.npz", x=x, cls=labels)), "--validate-target", "class"],
            "has no target 'class' (it has x, cls)",
        ),
        "metric raises": (
            ["--validate", HOLDOUT, "--metric", f"{folder / 'metrics.py'}:broken"],
            "metrics.py:broken raised ZeroDivisionError: division by zero",
        ),
        "metric returns no number": (
            ["--validate", HOLDOUT, "--metric", f"{folder / 'metrics.py'}:words"],
            "metrics.py:words returned str, not a number",
        ),
        "metric missing": (
            ["--validate", HOLDOUT, "--metric", f"{folder / 'metrics.py'}:nope"],
            "has no attribute 'nope'",
        ),
        "labels beyond the outputs": (
            ["--validate", str(write_npz(folder, "five.npz", x=x, labels=labels + 4))],
            "label 4 is outside the model's 2 output classes",
        ),
        "regression targets of another shape": (
            ["--validate", str(write_npz(folder, "wide.npz", x=x, y=np.zeros((488, 3), np.float32)))],
            "outputs of shape (64, 2) do not fit targets of shape (64, 3)",
        ),
        "mode of a built-in metric": (
            ["--validate", HOLDOUT, "--metric", "mse", "--metric-mode", "max"],
            "--metric-mode applies to a metric callable",
        ),
        "metric without validate": (["--metric", "mse"], "--metric needs --validate"),
        "allow-worse without validate": (["--allow-worse"], "--allow-worse needs --validate"),
    }


CASES = [
    "missing file",
    "fewer targets than inputs",
    "a batch with fewer targets",
    "inputs only (tensor file)",
    "inputs only (callable)",
    "no target name",
    "unknown target",
    "metric raises",
    "metric returns no number",
    "metric missing",
    "labels beyond the outputs",
    "regression targets of another shape",
    "mode of a built-in metric",
    "metric without validate",
    "allow-worse without validate",
]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_and_write_nothing(cli, tmp_path: Path, case: str) -> None:
    cases = error_cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    args, fragment = cases[case]
    out = tmp_path / "out.safetensors"
    result = cli("recalibrate", STALE, *RECALIBRATE, "-o", out, *args)
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("bncheck: error: ") and "internal error" not in line
    assert fragment in line
    assert not out.exists() and temp_files(tmp_path) == []


def test_a_real_process_refuses_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    out = tmp_path / "out.ckpt"
    result = run_process("recalibrate", FROZEN, *RECALIBRATE, "-o", out, "--validate", HOLDOUT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_the_readme_numbers_and_refusal_are_real(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    import shlex

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- validate-table: checked by tests/test_validate.py -->")[1].split("\n\n")[0]
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", table, flags=re.MULTILINE)
    assert len(rows) == 5
    for name, kind, stored, recalibrated in rows:
        request = RecomputeRequest(model=MODEL, data=str(R / f"sample-{kind}.npy"), max_samples=512)
        holdout = f"{R / 'models.py'}:{kind}_holdout"
        _, validation = recalibrate_validated(R / name, tmp_path / name, request, validate=holdout, allow_worse=True)
        assert validation is not None
        assert (f"{validation.stored:.3f}", f"{validation.recalibrated:.3f}") == (stored, recalibrated), name
    # the command and the refusal it prints
    section = readme[readme.index("give `recalibrate` some with `--validate`") :]
    command = re.search(r"```sh\n(.*?)\n```", section, flags=re.DOTALL).group(1).replace("\\\n", " ")
    shown = re.search(r"```text\n(.*?)\n```", section, flags=re.DOTALL).group(1)
    args = shlex.split(command)
    assert args[:2] == ["bncheck", "recalibrate"]
    args[args.index("-o") + 1] = str(tmp_path / "recalibrated.ckpt")
    monkeypatch.chdir(ROOT)
    result = cli(*args[1:])
    assert result.exit_code == 2
    assert result.stderr.strip() == shown
