"""How recomputation is fed: DataLoader shapes, input selection, streaming within a sample budget, dtypes and
devices, state dicts torch accepts, and failures that say what to do. Each case is built from its real mechanism."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT
from safetensors.torch import save_file

from bncheck.cli import _DEFAULT_MAX_SAMPLES
from bncheck.recompute import DEFAULT_MAX_SAMPLES

R = FIXTURES / "recompute"
MODEL = f"{R / 'models.py'}:tabular_mlp"
ORIGINAL = R / "sample-original.npy"
LABELS = R / "labels.npy"
SCHEMA = json.loads((ROOT / "bncheck" / "schema" / "report-v1.schema.json").read_text())


def write_module(tmp_path: Path, body: str, name: str = "feed.py") -> Path:
    path = tmp_path / name
    path.write_text(
        "import numpy as np\nimport torch\nfrom torch.utils.data import DataLoader, TensorDataset\n"
        f"X = torch.from_numpy(np.load({str(ORIGINAL)!r}))\nY = torch.from_numpy(np.load({str(LABELS)!r}))\n"
        + textwrap.dedent(body)
    )
    return path


def load_attribute(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"test_feed_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def recompute_of(cli, checkpoint: Path, data: str | Path, *extra: str | Path) -> tuple[int, dict]:
    result = cli("inspect", checkpoint, "--model", MODEL, "--data", data, "--json", *extra)
    (file,) = result.json()["files"]
    return result.exit_code, file


def drift_numbers(file: dict) -> list[float]:
    return [row[key] for row in file["recompute"]["layers"] for key in ("mean_shift_worst", "log_var_ratio_worst")]


def test_an_inputs_and_labels_loader_feeds_its_first_element_and_says_so(cli, tmp_path: Path) -> None:
    feed = write_module(tmp_path, "def xy():\n    return DataLoader(TensorDataset(X, Y), batch_size=100)\n")
    code, file = recompute_of(cli, R / "healthy.pt", f"{feed}:xy")
    assert code == 0 and file["recompute_error"] is None
    assert any("element 0 was used" in note for note in file["recompute"]["notes"])
    _, reference = recompute_of(cli, R / "healthy.pt", ORIGINAL, "--batch-size", "100")
    assert drift_numbers(file) == drift_numbers(reference)
    _, chosen = recompute_of(cli, R / "healthy.pt", f"{feed}:xy", "--inputs", "0")
    assert drift_numbers(chosen) == drift_numbers(reference)
    assert not any("element 0" in note for note in chosen["recompute"]["notes"])


def test_dict_batches_take_their_inputs_by_key(cli, tmp_path: Path) -> None:
    feed = write_module(
        tmp_path,
        """
        def records():
            for i in range(0, 1000, 100):
                yield {"image": X[i : i + 100], "label": Y[i : i + 100]}
        """,
    )
    code, file = recompute_of(cli, R / "healthy.pt", f"{feed}:records")
    assert code == 2 and file["recompute"] is None
    message = file["recompute_error"]["message"]
    assert "unexpected keyword argument" in message and "--inputs" in message  # the call failed on the structure
    code, file = recompute_of(cli, R / "healthy.pt", f"{feed}:records", "--inputs", "image")
    assert code == 0 and file["recompute"]["samples"] == 1000
    code, file = recompute_of(cli, R / "healthy.pt", f"{feed}:records", "--inputs", "pixels")
    assert code == 2 and "no element 'pixels'" in file["recompute_error"]["message"]


@pytest.mark.parametrize(
    "how",
    [
        ("--batch-size", "1"),
        ("--max-samples", "1"),
        ("--data", "LOADER"),
    ],
)
def test_when_every_batch_is_skipped_nothing_is_passed(cli, tmp_path: Path, how: tuple[str, str]) -> None:
    feed = write_module(tmp_path, "def singles():\n    return DataLoader(TensorDataset(X), batch_size=1)\n")
    option, value = how
    data = f"{feed}:singles" if value == "LOADER" else str(ORIGINAL)
    extra = [] if option == "--data" else [option, value]
    code, file = recompute_of(cli, R / "healthy.pt", data, *extra)
    assert code == 2
    assert file["recompute"] is None and "every batch was skipped" in file["recompute_error"]["message"]
    assert "--batch-size 2 or more" in file["recompute_error"]["message"]


ENDLESS = """
import itertools, resource, sys

import torch

from bncheck.cli import run


def wide():
    return torch.nn.Sequential(torch.nn.Linear(1024, 8, bias=False), torch.nn.BatchNorm1d(8))


def endless():
    generator = torch.Generator().manual_seed(0)
    while True:  # 1 MiB per batch
        yield torch.randn(256, 1024, generator=generator)


if __name__ == "__main__":
    checkpoint, budget = sys.argv[1], sys.argv[2]
    extra = [] if budget == "default" else ["--max-samples", budget]
    here = __file__
    code = run(["inspect", checkpoint, "--model", f"{here}:wide", "--data", f"{here}:endless", "--json", *extra])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)  # peak RSS, MiB
    sys.exit(code)
"""


def test_an_endless_loader_is_streamed_within_its_budget(tmp_path: Path) -> None:
    script = tmp_path / "endless.py"
    script.write_text(ENDLESS)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 8, bias=False), torch.nn.BatchNorm1d(8))
    checkpoint = tmp_path / "wide.pt"
    torch.save(model.state_dict(), checkpoint)

    def run(budget: str) -> tuple[int, dict]:
        done = subprocess.run(
            [sys.executable, str(script), str(checkpoint), budget],
            capture_output=True,
            text=True,
            check=False,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode in (0, 1), done.stderr
        return int(done.stderr.split()[-1]), json.loads(done.stdout)["files"][0]["recompute"]

    small_rss, small = run("2560")  # 10 batches
    large_rss, large = run("128000")  # 500 batches: 500 MiB if they were held
    assert (small["samples"], large["samples"]) == (2560, 128000)
    assert large_rss - small_rss < 64, (small_rss, large_rss)
    _, default = run("default")
    assert default["samples"] == DEFAULT_MAX_SAMPLES


def test_the_default_sample_budget_is_the_one_help_states(cli) -> None:
    assert int(_DEFAULT_MAX_SAMPLES) == DEFAULT_MAX_SAMPLES
    help_text = " ".join(cli("inspect", "--help").stdout.split())
    assert f"[default: {DEFAULT_MAX_SAMPLES}]" in help_text and "'all' reads the whole loader" in help_text
    code, file = recompute_of(cli, R / "healthy.pt", ORIGINAL, "--max-samples", "all")
    assert code == 0 and file["recompute"]["samples"] == 1000
    assert cli("inspect", R / "healthy.pt", "--model", MODEL, "--data", ORIGINAL, "--max-samples", "0").exit_code == 2


def test_a_state_dict_without_counters_loads_as_torch_loads_it(cli, tmp_path: Path) -> None:
    state = torch.load(R / "healthy.pt", weights_only=True)
    tensors = {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    sys.path.insert(0, str(R))
    from models import tabular_mlp

    assert str(tabular_mlp().load_state_dict(dict(tensors), strict=True)) == "<All keys matched successfully>"
    path = tmp_path / "no-counters.safetensors"
    save_file(tensors, path)
    code, file = recompute_of(cli, path, ORIGINAL)
    assert file["recompute_error"] is None and [r["stale"] for r in file["recompute"]["layers"]] == [False, False]
    assert {f["code"] for f in file["findings"]} == {"BN010"}  # the missing counter is still a finding
    assert code == 0
    out = tmp_path / "recalibrated.safetensors"
    assert cli("recalibrate", path, "--model", MODEL, "--data", ORIGINAL, "-o", out).exit_code == 0


def test_float64_samples_are_cast_to_the_models_dtype(cli, tmp_path: Path) -> None:
    wide = tmp_path / "float64.npy"
    np.save(wide, np.load(ORIGINAL).astype(np.float64))
    code, file = recompute_of(cli, R / "healthy.pt", wide)
    assert code == 0
    assert "float64 inputs were cast to float32, the model's dtype" in file["recompute"]["notes"]
    _, reference = recompute_of(cli, R / "healthy.pt", ORIGINAL)
    assert drift_numbers(file) == pytest.approx(drift_numbers(reference), rel=1e-6)


NESTED = """
class Nested(torch.nn.Module):
    \"\"\"Takes a dict holding a list: the tensors inside must be cast and moved too.\"\"\"

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(20, 4, bias=False)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, record):
        first, second = record["parts"]
        return self.bn(self.linear(first + second))


def nested_batches():
    x = X.double()
    for i in range(0, 1000, 100):
        yield ({"parts": [x[i : i + 100], x[i : i + 100] * 0.5]},)
"""


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_nested_inputs_are_cast_and_moved(cli, tmp_path: Path, device: str) -> None:
    feed = write_module(tmp_path, NESTED)
    Nested = load_attribute(feed, "Nested")

    torch.manual_seed(0)
    checkpoint = tmp_path / "nested.pt"
    torch.save(Nested().state_dict(), checkpoint)
    result = cli(
        "inspect", checkpoint, "--model", f"{feed}:Nested", "--data", f"{feed}:nested_batches", "--json",
        "--device", device,
    )  # fmt: skip
    info = result.json()["files"][0]["recompute"]
    assert info is not None and info["samples"] == 1000
    assert "float64 inputs were cast to float32, the model's dtype" in info["notes"]


def test_a_model_that_does_not_fit_keeps_the_files_static_findings(cli) -> None:
    bad = FIXTURES / "bad" / "BN002-negative-var.safetensors"
    code, file = recompute_of(cli, bad, ORIGINAL)
    assert code == 2 and file["error"] is None
    assert "BN002" in {f["code"] for f in file["findings"]}
    assert "does not fit the model" in file["recompute_error"]["message"]
    document = cli("inspect", bad, "--model", MODEL, "--data", ORIGINAL, "--json").json()
    jsonschema.Draft202012Validator(SCHEMA).validate(document)
    assert document["summary"]["recompute_failed"] == 1 and document["ok"] is False
    text = cli("inspect", bad, "--model", MODEL, "--data", ORIGINAL)
    out = " ".join(text.stdout.split())
    assert "BN002" in out and "recompute failed: checkpoint does not fit the model" in out
    assert "NOT RECOMPUTED" in out and "1 not recomputed -> FAIL" in out and text.exit_code == 2


AUX = """
class WithAux(torch.nn.Module):
    \"\"\"An auxiliary head that only training code calls: eval-time forward never reaches it.\"\"\"

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(20, 4, bias=False)
        self.bn = torch.nn.BatchNorm1d(4)
        self.aux = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.linear(x))
"""


def test_layers_the_forward_pass_never_reaches_are_listed_and_left_alone(cli, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    feed = write_module(tmp_path, AUX)
    WithAux = load_attribute(feed, "WithAux")

    torch.manual_seed(0)
    model = WithAux()
    x = torch.from_numpy(np.load(ORIGINAL))
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(x[:200])
            model.aux(model.linear(x[200:400]) * 2)  # the training loop's own use of the head
    checkpoint = tmp_path / "aux.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)
    result = cli("inspect", checkpoint, "--model", f"{feed}:WithAux", "--data", ORIGINAL, "--json")
    jsonschema.Draft202012Validator(SCHEMA).validate(result.json())
    info = result.json()["files"][0]["recompute"]
    assert [row["name"] for row in info["layers"]] == ["bn"]
    assert info["unmeasured"] == [
        {"name": "aux", "module": "aux", "reason": "not reached by the forward pass on this data"}
    ]
    text = cli("inspect", checkpoint, "--model", f"{feed}:WithAux", "--data", ORIGINAL)
    assert "not measured: aux: not reached by the forward pass" in " ".join(text.stdout.split())
    out = tmp_path / "recalibrated.safetensors"
    written = cli("recalibrate", checkpoint, "--model", f"{feed}:WithAux", "--data", ORIGINAL, "-o", out)
    assert written.exit_code == 0, written.stderr
    assert "left as stored: aux" in " ".join(written.stdout.split())
    before, after = load_file(checkpoint), load_file(out)
    for name in ("aux.running_mean", "aux.running_var", "aux.num_batches_tracked"):
        np.testing.assert_array_equal(before[name], after[name])
    assert not np.array_equal(before["bn.running_var"], after["bn.running_var"])


def test_progress_hears_the_total_before_the_first_batch() -> None:
    from bncheck.api import inspect
    from bncheck.recompute import RecomputeRequest

    heard: list[tuple[str, int | None]] = []

    class Recorder:
        def start(self, total_samples: int | None) -> None:
            heard.append(("start", total_samples))

        def advance(self, samples: int) -> None:
            heard.append(("advance", samples))

    request = RecomputeRequest(model=MODEL, data=str(ORIGINAL), batch_size=300, max_samples=700)
    inspect(R / "healthy.pt", recompute=request, progress=Recorder())
    assert heard == [("start", 700), ("advance", 300), ("advance", 300), ("advance", 100)]


def test_small_batches_are_warned_about(cli) -> None:
    _, small = recompute_of(cli, R / "healthy.pt", ORIGINAL, "--batch-size", "8")
    assert any("batches of 8 samples on average" in note for note in small["recompute"]["notes"])
    _, usual = recompute_of(cli, R / "healthy.pt", ORIGINAL)
    assert not any("batches of" in note for note in usual["recompute"]["notes"])


def test_the_progress_bar_shows_loading_then_samples_of_the_total() -> None:
    import io

    from rich.console import Console
    from rich.progress import Progress

    from bncheck.cli import _ProgressBar, progress_columns

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, color_system=None, width=160)
    with Progress(*progress_columns(), console=console, auto_refresh=False) as progress:
        bar = _ProgressBar(progress)
        progress.refresh()
        bar.start(1000)
        progress.refresh()
        bar.advance(300)
        progress.refresh()
    frames = screen.getvalue()
    assert "loading the model and data" in frames and "loading the first batch" in frames
    assert "running the model" in frames and "300/1000 samples" in frames
