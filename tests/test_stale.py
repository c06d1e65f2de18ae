"""BN012 and recalibrate end to end on the recompute fixtures, through the CLI."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_process

R = FIXTURES / "recompute"
MODEL = f"{R / 'models.py'}:tabular_mlp"
ORIGINAL = R / "sample-original.npy"
SHIFTED = R / "sample-shifted.npy"


def stale_layers(cli, checkpoint: Path, data: Path, *extra: str) -> tuple[int, list[str], dict]:
    result = cli("inspect", checkpoint, "--model", MODEL, "--data", data, "--json", *extra)
    (file,) = result.json()["files"]
    assert file["error"] is None, file["error"]
    return result.exit_code, [f["layer"] for f in file["findings"] if f["code"] == "BN012"], file["recompute"]


@pytest.mark.parametrize("samples", ["256", "1000"])
def test_healthy_model_is_not_stale_even_on_256_samples(cli, samples: str) -> None:
    code, stale, info = stale_layers(cli, R / "healthy.pt", ORIGINAL, "--max-samples", samples)
    assert (code, stale) == (0, [])
    assert info["samples"] == int(samples)
    assert info["too_few_samples"] is False
    assert [row["stale"] for row in info["layers"]] == [False, False]


@pytest.mark.parametrize("estimator", ["exact", "pytorch"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_healthy_model_passes_under_every_estimator_and_mode(cli, estimator: str, mode: str) -> None:
    code, stale, _ = stale_layers(
        cli, R / "healthy.pt", ORIGINAL, "--estimator", estimator, "--mode", mode, "--batch-size", "16"
    )
    assert (code, stale) == (0, [])


@pytest.mark.parametrize(
    ("checkpoint", "data", "expected"),
    [
        ("stale-untracked-finetune.safetensors", SHIFTED, ["1"]),
        ("averaged-two-runs.pt", ORIGINAL, ["1", "5"]),
        ("pruned-after-stats.pth", ORIGINAL, ["module.1", "module.5"]),
        ("frozen-bn-finetune.ckpt", SHIFTED, ["model.1"]),
    ],
)
def test_stale_fixtures_are_flagged(cli, checkpoint: str, data: Path, expected: list[str]) -> None:
    code, stale, info = stale_layers(cli, R / checkpoint, data, "--max-samples", "512")
    assert code == 1
    assert stale == expected
    assert info["mode"] == "train" and info["estimator"] == "exact"
    assert "pooled" in info["variance_convention"]


def test_a_silenced_layer_is_reported_but_not_a_finding(cli) -> None:
    code, stale, info = stale_layers(cli, R / "frozen-bn-finetune.ckpt", SHIFTED, "--skip-layer", "model.*")
    assert (code, stale) == (0, [])
    assert [(row["name"], row["stale"], row["silenced"]) for row in info["layers"]] == [
        ("model.1", True, True),
        ("model.5", False, True),
    ]


def test_too_few_samples_is_said(cli) -> None:
    _, stale, info = stale_layers(cli, R / "healthy.pt", ORIGINAL, "--max-samples", "20", "--batch-size", "10")
    assert info["too_few_samples"] is True
    assert stale == []


def test_data_callable_and_text_report(cli) -> None:
    result = cli(
        "inspect", R / "averaged-two-runs.pt", "--model", MODEL, "--data", f"{R / 'models.py'}:original_loader"
    )
    assert result.exit_code == 1
    assert "recomputed in train mode on 1000 samples (16 batches)" in " ".join(result.stdout.split())
    assert "STALE" in result.stdout and "BN012" in result.stdout


def eval_accuracy(state: dict[str, torch.Tensor], data: Path) -> float:
    sys.path.insert(0, str(R))
    from models import tabular_mlp

    model = tabular_mlp()
    model.load_state_dict(state)
    model.eval()
    x = torch.from_numpy(np.load(data))[512:]  # held out: recalibration uses the first 512
    y = torch.from_numpy(np.load(R / "labels.npy"))[512:]
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recalibrate_restores_eval_accuracy_of_the_stale_fixture(cli, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = R / "stale-untracked-finetune.safetensors"
    digest = sha256(source)
    out = tmp_path / "fixed.safetensors"
    result = cli("recalibrate", source, "--model", MODEL, "--data", SHIFTED, "--max-samples", "512", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert sha256(source) == digest
    before, after = eval_accuracy(load_file(source), SHIFTED), eval_accuracy(load_file(out), SHIFTED)
    assert after > before + 0.02, f"eval accuracy {before:.3f} before, {after:.3f} after recalibration"
    # the output passes inspect and is no longer stale on the same data
    code, stale, _ = stale_layers(cli, out, SHIFTED, "--max-samples", "512")
    assert (code, stale) == (0, [])
    # only the BatchNorm buffers changed; counters are the number of batches used
    old, new = load_file(source), load_file(out)
    for name in old:
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(old[name], new[name]), name
        elif name.endswith("num_batches_tracked"):
            assert int(new[name]) == 8
        else:
            assert torch.equal(old[name], new[name]), name


def test_recalibrating_a_deliberate_frozen_bn_finetune_makes_it_worse(cli, tmp_path: Path) -> None:
    source = R / "frozen-bn-finetune.ckpt"
    out = tmp_path / "recalibrated.ckpt"
    assert (
        cli("recalibrate", source, "--model", MODEL, "--data", SHIFTED, "--max-samples", "512", "-o", out).exit_code
        == 0
    )
    original = torch.load(source, weights_only=True)
    written = torch.load(out, weights_only=True)
    assert written["epoch"] == original["epoch"]  # every other entry kept
    strip = lambda sd: {k.removeprefix("model."): v for k, v in sd.items()}  # noqa: E731
    before = eval_accuracy(strip(original["state_dict"]), SHIFTED)
    after = eval_accuracy(strip(written["state_dict"]), SHIFTED)
    assert after < before  # why the report says: silence the layer instead


def test_recalibrated_zip_keeps_every_other_byte(cli, tmp_path: Path) -> None:
    source = R / "pruned-after-stats.pth"
    out = tmp_path / "out.pth"
    assert cli("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", out).exit_code == 0
    a, b = source.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    changed = sum(1 for x, y in zip(a, b, strict=True) if x != y)
    stats_bytes = 2 * (64 + 64) * 4 + 2 * 8  # two layers: mean and var float32, counters int64
    assert 0 < changed <= stats_bytes + 64  # plus the CRC fields
    reread = torch.load(out, weights_only=True)
    assert int(reread["module.1.num_batches_tracked"]) == 16


def test_recalibrate_refuses_to_overwrite(cli, tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes((R / "healthy.pt").read_bytes())
    digest = sha256(source)
    same = cli("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", source)
    assert same.exit_code == 2 and "refusing to overwrite the input" in same.stderr
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep me")
    refused = cli("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", existing)
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert existing.read_bytes() == b"keep me"
    forced = cli("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", existing, "--force")
    assert forced.exit_code == 0
    assert sha256(source) == digest
    assert [p.name for p in tmp_path.iterdir() if "bncheck-tmp" in p.name] == []


def test_a_copy_that_fails_inspection_is_never_renamed_into_place(cli, tmp_path: Path) -> None:
    # fp16 statistics of the raw-feature model overflow when recomputed on raw data: the copy would hold inf
    from safetensors.torch import load_file, save_file

    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in load_file(R / "stale-untracked-finetune.safetensors").items()
    }
    source = tmp_path / "half.safetensors"
    save_file(state, source)
    loud = tmp_path / "loud.npy"
    np.save(loud, np.load(SHIFTED) * 1000)
    out = tmp_path / "out.safetensors"
    result = cli("recalibrate", source, "--model", MODEL, "--data", loud, "-o", out)
    assert result.exit_code == 2
    assert "fails inspection: BN001" in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "bncheck-tmp" in p.name] == []


def test_torchscript_checkpoint_is_its_own_model(cli, tmp_path: Path) -> None:
    sys.path.insert(0, str(R))
    from models import tabular_mlp

    model = tabular_mlp()
    model.load_state_dict(torch.load(R / "healthy.pt", weights_only=True))
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    result = cli("inspect", path, "--model", path, "--data", ORIGINAL, "--json")
    assert result.exit_code == 0
    assert [row["stale"] for row in result.json()["files"][0]["recompute"]["layers"]] == [False, False]


BAD_ARGUMENTS = {
    "missing model file": (["--model", "nowhere/models.py:f", "--data", ORIGINAL], "no such file: nowhere/models.py"),
    "missing attribute": (["--model", f"{R / 'models.py'}:nope", "--data", ORIGINAL], "has no attribute 'nope'"),
    "factory raises": (["--model", MODEL, "--model-kwargs", '{"n_in": -3}', "--data", ORIGINAL], "model factory"),
    "bad kwargs json": (["--model", MODEL, "--model-kwargs", "{n_in: 3}", "--data", ORIGINAL], "not valid JSON"),
    "shape mismatch": (
        ["--model", MODEL, "--model-kwargs", '{"hidden": 32}', "--data", ORIGINAL],
        "does not fit the model",
    ),
    "data file missing": (["--model", MODEL, "--data", "nowhere.npy"], "no such file: nowhere.npy"),
    "data file without callable": (["--model", MODEL, "--data", R / "models.py"], "models.py:NAME"),
    "model file without factory": (["--model", R / "models.py", "--data", ORIGINAL], "models.py:NAME"),
    "data without sample axis": (["--model", MODEL, "--data", "SCALAR"], "need a sample axis"),
    "data of the wrong width": (
        ["--model", MODEL, "--data", "NARROW"],
        "the model failed on the sample data: RuntimeError: mat1 and mat2 shapes cannot be multiplied",
    ),
    "model without data": (["--model", MODEL], "--model and --data go together"),
    "not a module spec": (["--model", "justaword", "--data", ORIGINAL], "no such file: justaword (expected"),
    "importing fails": (["--model", "no_such_package_xyz:make", "--data", ORIGINAL], "importing no_such_package_xyz"),
    "unknown device": (["--model", MODEL, "--data", ORIGINAL, "--device", "gpu9"], "cannot use device 'gpu9'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_model_and_data_arguments_are_one_line_errors(tmp_path: Path, case: str) -> None:
    args, fragment = BAD_ARGUMENTS[case]
    np.save(tmp_path / "scalar.npy", np.float32(3.0))
    np.save(tmp_path / "narrow.npy", np.zeros((8, 5), np.float32))
    args = [
        str(tmp_path / "scalar.npy") if a == "SCALAR" else str(tmp_path / "narrow.npy") if a == "NARROW" else a
        for a in map(str, args)
    ]
    result = run_process("inspect", R / "healthy.pt", *args)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # arguments that fail before any file is read go to stderr; a checkpoint that does not fit the model is that
    # file's one-line error in the report
    assert fragment in " ".join((result.stderr + result.stdout).split()), result.stderr + result.stdout
    assert len(lines) <= 1, lines  # none when the text report carries the file's error


def test_recompute_needs_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from bncheck.errors import TorchRequiredError
    from bncheck.model_data import load_model

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TorchRequiredError, match=r"pip install 'bncheck\[torch\]'"):
        load_model(MODEL)


def test_json_recompute_document_is_valid_json(cli) -> None:
    result = cli("inspect", R / "averaged-two-runs.pt", "--model", MODEL, "--data", ORIGINAL, "--json")
    json.loads(result.stdout)
    rows = result.json()["files"][0]["recompute"]["layers"]
    assert list(rows[0]) == [
        "name",
        "source",
        "module",
        "samples",
        "mean_shift_median",
        "mean_shift_worst",
        "log_var_ratio_median",
        "log_var_ratio_worst",
        "stale",
        "silenced",
    ]


def test_tensor_file_data_formats(cli, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    samples = np.load(ORIGINAL)
    save_file({"inputs": samples}, tmp_path / "one.safetensors")
    torch.save({"x": torch.from_numpy(samples)}, tmp_path / "one.pt")
    np.savez(tmp_path / "one.npz", inputs=samples)
    for data in ("one.safetensors", "one.pt", "one.npz"):
        code, stale, info = stale_layers(cli, R / "healthy.pt", tmp_path / data)
        assert (code, stale, info["samples"]) == (0, [], 1000), data


def test_several_named_tensors_are_keyword_arguments(tmp_path: Path) -> None:
    from bncheck.model_data import SampleData, model_batches

    np.savez(tmp_path / "two.npz", a=np.zeros((10, 3), np.float32), b=np.ones((10, 2), np.float32))
    data = SampleData(spec=str(tmp_path / "two.npz"), batch_size=4)
    batches = list(model_batches(data, torch.nn.BatchNorm1d(3), []))
    assert [sorted(b.kwargs) for b in batches] == [["a", "b"]] * 3
    assert [b.kwargs["b"].shape[0] for b in batches] == [4, 4, 2]


def test_recalibrated_copy_keeps_the_input_permission_bits(cli, tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes((R / "healthy.pt").read_bytes())
    source.chmod(0o640)  # neither mkstemp's 0600 nor what the usual umask gives a new file
    out = tmp_path / "fixed.pt"
    assert cli("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", out).exit_code == 0
    assert out.stat().st_mode & 0o7777 == 0o640


def test_output_that_is_a_directory_is_refused_even_with_force(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes((R / "healthy.pt").read_bytes())
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep me")
    result = run_process("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", folder, "--force")
    assert result.returncode == 2
    assert result.stderr == f"bncheck: error: {folder} is a directory; give the path of the file to write\n"
    assert (folder / "keep.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if "bncheck-tmp" in p.name] == []


def test_the_directory_is_synced_after_the_rename(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bncheck.recalibrate as recalibrate_module

    synced = []
    real = recalibrate_module._fsync_directory

    def record(folder: Path) -> None:
        synced.append((folder, sorted(p.name for p in folder.iterdir())))
        real(folder)

    monkeypatch.setattr(recalibrate_module, "_fsync_directory", record)
    source = tmp_path / "model.pt"
    source.write_bytes((R / "healthy.pt").read_bytes())
    out = tmp_path / "sub" / "fixed.pt"
    assert cli("recalibrate", source, "--model", MODEL, "--data", ORIGINAL, "-o", out).exit_code == 0
    assert synced == [(out.parent, ["fixed.pt"])]  # after the rename: the output is in place, the temp file gone
