"""bncheck where statistics are born: a live module, a Lightning callback, a Hugging Face Trainer callback and a
pytest helper, each on real training runs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAD, FIXTURES, GOOD
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bncheck
from bncheck.api import inspect_file
from bncheck.checks import RULES
from bncheck.errors import BncheckError
from bncheck.integrations import BatchNormCheckError
from bncheck.read import read_checkpoint
from bncheck.testing import assert_batchnorm_healthy

# Warnings of the frameworks themselves about their own code and about the tiny runs here, each by its message.
FRAMEWORK_WARNINGS = [
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval"),
]
DIVERGING_LR = 1e4  # plain SGD on this net: activations overflow to inf within the first epoch
HEALTHY_LR = 0.05


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 2),
    )


def samples() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return x, (x[:, 0] > 0).long()


# ---------------------------------------------------------------- the live module


def test_a_live_module_gets_the_rules_and_names_of_a_file() -> None:
    model = mlp()
    model(torch.randn(32, 8))  # one train-mode step: statistics updated
    model[4].running_var[3] = float("nan")
    model[1].momentum = 0.99
    report = bncheck.inspect_module(model)
    found = {(f.code, f.layer) for f in report.findings}
    assert found == {("BN001", "4"), ("BN014", "1")}
    assert [layer.name for layer in report.layers] == ["1", "4"]
    assert [layer.kind for layer in report.layers] == ["BatchNorm1d", "BatchNorm1d"]
    assert report.layers[0].configuration.momentum is not None
    assert report.layers[0].configuration.momentum.source == "live module"
    assert report.layers[0].configuration.training is None  # a model being trained is in train mode by design


def test_lazy_and_meta_modules_hold_no_data() -> None:
    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    with torch.device("meta"):
        meta = nn.Sequential(nn.BatchNorm1d(3))
    assert {f.code for f in bncheck.inspect_module(lazy).findings} == {"BN018"}
    assert {f.code for f in bncheck.inspect_module(meta).findings} == {"BN018"}


def mirror(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose state_dict is ``state``: BatchNorm layers where the names hold running statistics."""
    root = nn.Module()
    prefixes = {name.rsplit(".", 1)[0] for name in state if name.endswith(".running_mean")}
    for prefix in sorted(prefixes):
        mean = state[f"{prefix}.running_mean"]
        *path, leaf = prefix.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        norm = nn.BatchNorm1d(mean.numel(), affine=f"{prefix}.weight" in state).to(mean.dtype)
        parent.add_module(leaf, norm)
    return root


def fixture_states() -> list[Path]:
    return sorted(p for p in [*GOOD.iterdir(), *BAD.iterdir()] if p.suffix in (".pt", ".safetensors", ".pth", ".ckpt"))


def test_a_live_module_gets_the_verdict_of_the_checkpoint_it_saves(tmp_path: Path) -> None:
    """Every fixture whose statistics a real module can hold: load them into modules, save that module's
    state_dict, and the live module and its checkpoint get the same findings (a state dict records no
    configuration, so the configuration rules are left out)."""
    compared = []
    for path in fixture_states():
        try:
            checkpoint, layers = read_checkpoint(path)
        except BncheckError:
            continue
        if not layers or checkpoint.globals or len({data.layer.source for data in layers}) > 1:
            continue  # pickled objects, several models in one file: not one module's state_dict
        state = {}
        for data in layers:
            for key, array in data.arrays.items():
                state[f"{data.layer.name}.{key}"] = torch.from_numpy(np.array(array))
        try:
            model = mirror(state)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, TypeError):
            continue  # a state no real module holds (wrong shapes, integer statistics, a missing buffer)
        saved = tmp_path / f"{path.stem}.pt"
        torch.save(model.state_dict(), saved)

        def findings(report: bncheck.FileReport) -> set[tuple[str, str | None, str]]:
            return {(f.code, f.layer, f.message) for f in report.findings if RULES[f.code].scope != "config"}

        assert findings(bncheck.inspect_module(model)) == findings(inspect_file(saved)), path.name
        compared.append(path.name)
    assert len(compared) >= 10, compared
    assert {"BN001-diverged-nan.pt", "BN002-negative-var.safetensors", "BN008-constant-feature.pt"} <= set(compared)


# ---------------------------------------------------------------- pytest helper


def test_the_pytest_helper_passes_a_healthy_module_and_names_each_finding_of_a_broken_one() -> None:
    model = mlp()
    model(torch.randn(32, 8))
    assert assert_batchnorm_healthy(model).ok
    model[1].running_var[:2] = -1.0
    model[4].running_mean[0] = float("inf")
    with pytest.raises(AssertionError) as raised:
        assert_batchnorm_healthy(model)
    lines = str(raised.value).splitlines()
    assert lines[1:] == [
        "<Sequential>:1: BN002 error running_var is negative in 2 channel(s), min -1",
        "<Sequential>:4: BN001 error running_mean has 1 non-finite value(s): 1 +Inf",
        "1 file, 2 layers: 2 errors, 0 warnings, 0 infos -> FAIL",
    ]


def test_the_pytest_helper_takes_paths_and_a_fail_level() -> None:
    assert assert_batchnorm_healthy(GOOD / "mlp-state-dict.pt").ok
    assert_batchnorm_healthy(BAD / "BN010-no-counter.pt")  # warnings only
    with pytest.raises(AssertionError, match="BN010 warning"):
        assert_batchnorm_healthy(BAD / "BN010-no-counter.pt", fail_on="warning")
    with pytest.raises(AssertionError, match="not checked: no such file"):
        assert_batchnorm_healthy(FIXTURES / "missing.pt")


# ---------------------------------------------------------------- Lightning


def lit_net(lr: float) -> torch.nn.Module:
    """A LightningModule around mlp(), trained with plain SGD. Lightning is imported here, not when the tests are
    collected: importing it grows every test process by about 200 MB (tests/test_bounded.py bounds the peak)."""
    import lightning

    class LitNet(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return LitNet()


def fit(tmp_path: Path, lr: float, **check: object) -> tuple[Path, Path]:
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from bncheck.integrations.lightning import BNCheck

    torch.manual_seed(0)
    saved = tmp_path / "checkpoints"
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[ModelCheckpoint(dirpath=saved, save_top_k=-1, every_n_epochs=1), BNCheck(**check)],
        logger=CSVLogger(tmp_path / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit_net(lr), DataLoader(TensorDataset(*samples()), batch_size=32))
    return saved, tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv"


@FRAMEWORK_WARNINGS[0]
@FRAMEWORK_WARNINGS[1]
def test_lightning_stops_a_diverging_run_before_its_checkpoint_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(BatchNormCheckError, match=r"before saving the checkpoint of step 8") as raised:
        fit(tmp_path, DIVERGING_LR)
    assert "BN001 error running_var has" in str(raised.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing written
    assert any("BN001" in record.getMessage() for record in caplog.records if record.name == "bncheck")


@FRAMEWORK_WARNINGS[0]
@FRAMEWORK_WARNINGS[1]
def test_lightning_lets_a_healthy_run_save_and_logs_its_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bncheck")
    saved, metrics = fit(tmp_path, HEALTHY_LR)
    assert sorted(p.name for p in saved.glob("*.ckpt")) == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt"]
    assert not [r for r in caplog.records if r.name == "bncheck"]
    rows = list(csv.DictReader(metrics.read_text().splitlines()))
    assert [(row["step"], row["bncheck/errors"]) for row in rows] == [("8", "0.0"), ("16", "0.0"), ("16", "0.0")]
    for checkpoint in saved.glob("*.ckpt"):  # and the checkpoints it let through pass the command line too
        assert inspect_file(checkpoint).count(bncheck.Severity.ERROR) == 0


@FRAMEWORK_WARNINGS[0]
@FRAMEWORK_WARNINGS[1]
def test_lightning_only_reports_without_a_fail_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    saved, metrics = fit(tmp_path, DIVERGING_LR, fail_on=None)
    assert len(list(saved.glob("*.ckpt"))) == 2
    assert any("BN001" in r.getMessage() for r in caplog.records if r.name == "bncheck")
    assert float(next(csv.DictReader(metrics.read_text().splitlines()))["bncheck/errors"]) >= 1


# ---------------------------------------------------------------- Hugging Face Trainer


class HFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def train_hf(tmp_path: Path, lr: float) -> Path:
    import transformers

    from bncheck.integrations.transformers import BNCheckCallback

    torch.manual_seed(0)
    x, y = samples()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=32,
        max_steps=16,
        save_steps=8,
        learning_rate=lr,
        optim="sgd",
        max_grad_norm=0.0,  # no clipping, so that a diverging learning rate diverges
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
    )
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    trainer = transformers.Trainer(model=HFNet(), args=args, train_dataset=dataset, callbacks=[BNCheckCallback()])
    trainer.train()
    return tmp_path / "out"


@FRAMEWORK_WARNINGS[0]
@FRAMEWORK_WARNINGS[1]
def test_the_hugging_face_trainer_stops_before_a_bad_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(BatchNormCheckError, match="before saving the checkpoint of step 8"):
        train_hf(tmp_path, DIVERGING_LR)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@FRAMEWORK_WARNINGS[0]
@FRAMEWORK_WARNINGS[1]
def test_the_hugging_face_trainer_saves_a_healthy_run(tmp_path: Path) -> None:
    out = train_hf(tmp_path, HEALTHY_LR)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    weights = out / "checkpoint-16" / "model.safetensors"
    assert inspect_file(weights).count(bncheck.Severity.ERROR) == 0
