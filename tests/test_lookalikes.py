"""Layers that are not what their keys seem: observation normalisers that store running statistics (not BatchNorm
at all), and FrozenBatchNorm2d, which keeps no num_batches_tracked by design (no BN010)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import BAD, FIXTURES, GOOD
from torch import nn

from bncheck.api import inspect_file
from bncheck.discover import find_bn_layers
from bncheck.loaders import open_checkpoint

DETECTOR = GOOD / "detector-frozen-bn-state-dict.pt"
DETECTOR_MODULE = BAD / "BN102-frozen-bn-detector-full-module.pt"


def layers(path: Path) -> list[tuple[str, str, str | None]]:
    return [(layer.source, layer.name, layer.frozen) for layer in find_bn_layers(open_checkpoint(path).root)]


def codes(path: Path) -> list[str]:
    report = inspect_file(path)
    assert report.error is None
    return [f.code for f in report.findings]


# ------------------------------------------------------------------------------------------ observation normalisers


def test_rl_games_running_mean_std_is_not_batchnorm() -> None:
    # running_mean_std and value_mean_std hold running_mean + running_var + count: the key set of a normaliser
    path = GOOD / "rl-games-running-mean-std.pth"
    assert {"model.running_mean_std.count", "model.value_mean_std.running_var"} <= set(names_in(path))
    assert layers(path) == [("model", "a2c_network.actor_mlp.1", None), ("model", "a2c_network.value.1", None)]
    assert codes(path) == []


def test_skrl_running_standard_scaler_is_not_batchnorm() -> None:
    path = GOOD / "skrl-running-standard-scaler.pt"
    assert {"state_preprocessor.running_variance", "state_preprocessor.current_count"} <= set(names_in(path))
    assert layers(path) == [("policy", "1", None), ("value", "1", None)]
    assert codes(path) == []


def names_in(path: Path) -> list[str]:
    root = open_checkpoint(path).root
    return [f"{source}.{name}" for source, entry in root.items() if isinstance(entry, dict) for name in entry]


def test_a_batchnorm_that_lost_its_var_is_still_checked() -> None:
    assert [name for _, name, _ in layers(BAD / "BN006-missing-var.pt")] == ["net.1", "net.4"]
    assert set(codes(BAD / "BN006-missing-var.pt")) == {"BN006"}


class RunningMeanStd(nn.Module):
    """Statistics without a counter (an older rl_games), whose class the pickle names."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(3))
        self.register_buffer("running_var", torch.ones(3))


class CountingBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm subclass whose counter is a float 'count' buffer."""

    def __init__(self) -> None:
        super().__init__(4, affine=False)
        del self.num_batches_tracked
        self.register_buffer("count", torch.zeros(()))


def test_a_normaliser_class_named_in_the_pickle_decides(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.obs_norm = RunningMeanStd()
    torch.save(model, tmp_path / "full.pt")
    assert [name for _, name, _ in layers(tmp_path / "full.pt")] == ["1"]


def test_a_batchnorm_class_keeps_a_layer_whatever_its_siblings(tmp_path: Path) -> None:
    # the class name decides before the keys: a BatchNorm subclass with a 'count' buffer is still BatchNorm
    torch.save(nn.Sequential(CountingBatchNorm1d()), tmp_path / "counting.pt")
    assert [name for _, name, _ in layers(tmp_path / "counting.pt")] == ["0"]


# ---------------------------------------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_class_named_in_the_pickle_has_no_bn010() -> None:
    found = find_bn_layers(open_checkpoint(DETECTOR_MODULE).root)
    assert [(layer.name, layer.kind, layer.frozen) for layer in found] == [
        ("backbone.body.bn1", "FrozenBatchNorm2d", "class"),
        ("backbone.body.layer1.1", "FrozenBatchNorm2d", "class"),
    ]
    assert "torchvision.ops.misc.FrozenBatchNorm2d" in open_checkpoint(DETECTOR_MODULE).globals
    assert codes(DETECTOR_MODULE) == ["BN102"]  # a fully pickled model; nothing about counters
    assert not any("FrozenBatchNorm2d's buffers" in note for note in inspect_file(DETECTOR_MODULE).notes)


def test_frozen_backbone_state_dict_gets_one_note_instead_of_bn010() -> None:
    assert layers(DETECTOR) == [
        ("", "backbone.body.bn1", "whole prefix"),
        ("", "backbone.body.layer1.1", "whole prefix"),
    ]
    report = inspect_file(DETECTOR)
    assert report.findings == ()
    (note,) = [note for note in report.notes if "FrozenBatchNorm2d" in note]
    assert "(2 under backbone.body)" in note and "a frozen backbone" in note


def detector_state(tmp_path: Path, name: str, edit: dict[str, torch.Tensor | None]) -> Path:
    state = dict(torch.load(DETECTOR))
    for key, value in edit.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_frozen_layers_beside_counted_batchnorm_layers(tmp_path: Path) -> None:
    # a trainable BatchNorm2d in the head carries its counter: the file's writer saved counters
    head_bn = nn.BatchNorm2d(8).state_dict()
    path = detector_state(tmp_path, "mixed.pt", {f"head.1.{k}": v for k, v in head_bn.items()})
    assert {frozen for _, _, frozen in layers(path)} == {"counters elsewhere", None}
    assert "BN010" not in codes(path)
    (note,) = [note for note in inspect_file(path).notes if "FrozenBatchNorm2d" in note]
    assert "while other BatchNorm layers of the file carry the counter" in note


def test_counters_stripped_from_a_whole_model_stay_bn010(tmp_path: Path) -> None:
    # the backbone alone, nothing outside it: an old or stripped checkpoint looks exactly like this
    state = {k: v for k, v in torch.load(DETECTOR).items() if k.startswith("backbone.body.")}
    torch.save(state, tmp_path / "body.pt")
    assert codes(tmp_path / "body.pt") == ["BN010", "BN010"]
    # the same under a wrapper prefix (DataParallel's module.) that covers the whole model
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
    assert codes(tmp_path / "wrapped.pt") == ["BN010", "BN010"]


def test_counterless_layers_that_are_not_frozen_buffers_keep_bn010(tmp_path: Path) -> None:
    # a stripped BatchNorm1d (fed by a Linear) beside the frozen-looking backbone suggests a stripped file
    path = detector_state(
        tmp_path,
        "stripped-1d.pt",
        {
            "head.fc.weight": torch.ones(8, 10),
            **{f"head.bn.{k}": v for k, v in nn.BatchNorm1d(8).state_dict().items() if k != "num_batches_tracked"},
        },
    )
    assert codes(path).count("BN010") == 3
    # an affine-free layer is no FrozenBatchNorm2d (which always has weight and bias)
    path = detector_state(tmp_path, "no-affine.pt", {"backbone.body.bn1.weight": None})
    assert codes(path).count("BN010") == 2


def test_old_conv_net_without_a_backbone_prefix_stays_bn010(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    assert codes(tmp_path / "old.pt").count("BN010") == 2


def test_the_bn010_fixture_is_still_reported() -> None:
    assert codes(BAD / "BN010-no-counter.pt") == ["BN010", "BN010"]
    assert FIXTURES.is_dir()
