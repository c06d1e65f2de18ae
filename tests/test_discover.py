"""BatchNorm layers are found wherever the saving code put them, with their origin and kind."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from conftest import GOOD
from safetensors.torch import save_file
from torch import nn

from bncheck.discover import find_bn_layers
from bncheck.loaders import open_checkpoint


def layers_in(path: Path) -> list[tuple[str, str, bool, str, bool]]:
    found = find_bn_layers(open_checkpoint(path).root)
    return [(layer.source, layer.name, layer.averaged, layer.kind, layer.kind_inferred) for layer in found]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 6),
        nn.BatchNorm1d(6),
        nn.Unflatten(1, (2, 3)),
        nn.InstanceNorm1d(2, track_running_stats=True),
    )
    model.train()
    model(torch.randn(5, 3, 8, 8))
    return model


def test_bare_state_dict_kinds_are_inferred_from_the_feeding_layer(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(small_model().state_dict(), path)
    assert layers_in(path) == [
        ("", "1", False, "BatchNorm2d", True),
        ("", "5", False, "BatchNorm1d", True),
        ("", "7", False, "BatchNorm", False),  # fed by a reshape, not by a Linear/Conv: no guess
    ]


def test_named_layers_are_inferred_by_the_conv_bn_naming_convention(tmp_path: Path) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv1d(3, 5, 1)
            self.bn1 = nn.BatchNorm1d(5)
            self.fc = nn.Linear(5, 7)
            self.norm = nn.BatchNorm1d(9)  # width does not match its namesake: no guess

    path = tmp_path / "block.safetensors"
    save_file(Block().state_dict(), path)
    assert {(n, k, i) for _, n, _, k, i in layers_in(path)} == {
        ("bn1", "BatchNorm1d", True),
        ("norm", "BatchNorm", False),
    }


def test_pickled_module_names_its_classes(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(small_model(), path)
    assert layers_in(path) == [
        ("", "1", False, "BatchNorm2d", False),
        ("", "5", False, "BatchNorm1d", False),
        ("", "7", False, "InstanceNorm1d", False),
    ]


def test_torchscript_names_its_classes() -> None:
    assert [(n, k, i) for _, n, _, k, i in layers_in(GOOD / "conv1d-torchscript.pt")] == [
        ("features.1", "BatchNorm1d", False),
        ("features.4", "BatchNorm1d", False),
    ]


def test_nested_checkpoints_report_their_source_entry() -> None:
    assert [(s, n) for s, n, *_ in layers_in(GOOD / "mlp-training-checkpoint.pth")] == [
        ("model", "net.1"),
        ("model", "net.4"),
    ]
    assert [(s, n) for s, n, *_ in layers_in(GOOD / "mlp-lightning-style.ckpt")] == [
        ("state_dict", "model.net.1"),
        ("state_dict", "model.net.4"),
    ]


def test_ema_entries_are_found_and_marked_averaged() -> None:
    assert [(s, n, a) for s, n, a, *_ in layers_in(GOOD / "mlp-ema-timm-style.pth")] == [
        ("state_dict", "net.1", False),
        ("state_dict", "net.4", False),
        ("state_dict_ema", "net.1", True),
        ("state_dict_ema", "net.4", True),
    ]


def test_averaged_model_state_dict_is_marked_by_n_averaged(tmp_path: Path) -> None:
    model = small_model()
    swa = torch.optim.swa_utils.AveragedModel(model)
    path = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), path)
    assert [(n, a) for _, n, a, *_ in layers_in(path)] == [
        ("module.1", True),
        ("module.5", True),
        ("module.7", True),
    ]


def test_wrapper_prefixes_keep_the_full_name() -> None:
    assert [n for _, n, *_ in layers_in(GOOD / "mlp-dataparallel.pt")] == ["module.net.1", "module.net.4"]
    assert [n for _, n, *_ in layers_in(GOOD / "mlp-compiled.pt")] == ["_orig_mod.net.1", "_orig_mod.net.4"]


def test_tensors_inside_untrusted_objects_are_still_found(tmp_path: Path) -> None:
    bn = nn.BatchNorm1d(3)
    hparams = argparse.Namespace(stats={"bn.running_mean": bn.running_mean, "bn.running_var": bn.running_var})
    path = tmp_path / "hp.ckpt"
    torch.save({"hyper_parameters": hparams, "epoch": 1}, path)
    (layer,) = find_bn_layers(open_checkpoint(path).root)
    assert layer.name == "bn"
    assert layer.source.startswith("hyper_parameters.")
    assert set(layer.tensors) == {"running_mean", "running_var"}


def test_a_layer_at_the_root_and_lists_of_models(tmp_path: Path) -> None:
    bn = nn.BatchNorm1d(4)
    path = tmp_path / "ensemble.pt"
    torch.save({"members": [bn.state_dict(), bn.state_dict()]}, path)
    assert [(s, n) for s, n, *_ in layers_in(path)] == [("members.0", ""), ("members.1", "")]


def test_cyclic_and_deep_trees_terminate(tmp_path: Path) -> None:
    cyclic: list = []
    cyclic.append(cyclic)
    deep: list = []
    node = deep
    for _ in range(150):
        node.append([])
        node = node[0]
    bn = nn.BatchNorm1d(2)
    path = tmp_path / "odd.pt"
    torch.save({"cycle": cyclic, "deep": deep, "model": bn.state_dict()}, path)
    assert [(s, n) for s, n, *_ in layers_in(path)] == [("model", "")]


def test_sync_batchnorm_class_is_reported(tmp_path: Path) -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4)))
    path = tmp_path / "sync.pt"
    torch.save(model, path)
    assert [(n, k) for _, n, _, k, _ in layers_in(path)] == [("1", "SyncBatchNorm")]


def test_gpu_saved_storages_are_read_without_a_gpu(tmp_path: Path) -> None:
    path = tmp_path / "cpu.pt"
    torch.save(nn.BatchNorm1d(3).state_dict(), path)
    target = tmp_path / "as-if-cuda.pt"
    import zipfile

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                # the location string is only a tag for torch's map_location; bncheck never needs the device
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(info.filename, data)
    assert b"cuda:0" in zipfile.ZipFile(target).read("cpu/data.pkl")
    (layer,) = find_bn_layers(open_checkpoint(target).root)
    assert layer.tensors["running_var"].read().tolist() == [1.0, 1.0, 1.0]


def test_layers_of_a_name_sorted_format_come_in_natural_order(tmp_path: Path) -> None:
    from safetensors.numpy import save_file as save_numpy

    from bncheck.read import read_checkpoint

    names = ["features.10", "features.2", "features.1", "layer1.10.bn1", "layer1.2.bn1", "layer1.0.bn1"]
    tensors = {f"{n}.{key}": np.ones(3, np.float32) for n in names for key in ("running_mean", "running_var")}
    save_numpy(tensors, str(tmp_path / "m.safetensors"))
    _, layers = read_checkpoint(tmp_path / "m.safetensors")
    assert [data.layer.name for data in layers] == [
        "features.1",
        "features.2",
        "features.10",
        "layer1.0.bn1",
        "layer1.2.bn1",
        "layer1.10.bn1",
    ]


def test_a_torch_state_dict_keeps_the_model_order() -> None:
    """A torch state dict lists a model's layers in the order they were registered: stem before blocks before head,
    which no sorting of names would give."""
    from bncheck.loaders.interface import in_memory

    names = ["stem.bn", "blocks.0.bn", "blocks.10.bn", "blocks.2.bn", "head.bn"]
    root = {
        f"{n}.{key}": in_memory(np.ones(3, np.float32), "float32")
        for n in names
        for key in ("running_mean", "running_var")
    }
    assert [layer.name for layer in find_bn_layers(root)] == names


def test_natural_key_orders_numbers_by_value_without_converting_them() -> None:
    from bncheck.discover import natural_key

    huge = "9" * 10_000  # int() refuses more than 4,300 digits
    assert sorted(["a.10", "a.9", f"a.{huge}", "a.009", "b"], key=natural_key) == [
        "a.009",
        "a.9",
        "a.10",
        f"a.{huge}",
        "b",
    ]


def test_a_module_path_is_averaged_when_one_of_its_components_is() -> None:
    # discovery matches the whole dotted path at once; it must agree with matching each component on its own
    from bncheck.discover import _AVERAGED, _AVERAGED_PATH

    rng = random.Random(1)
    parts = ["ema", "swa", "averaged", "x", "model_ema", "ema_model", "emax", "xema", "EMA", "swa_model", "a_b", ""]
    for _ in range(5000):
        path = ".".join(rng.choice(parts) for _ in range(rng.randint(1, 4)))
        by_component = any(_AVERAGED.search(part) for part in path.split("."))
        assert (_AVERAGED_PATH.search(path) is not None) == by_component, path
