"""Large and many-small checkpoints for the benchmarks and the remote-read tests, generated once and cached.

The large one is the state dict of ``nn.Sequential(*[Linear(1024, 1024), BatchNorm1d(1024), ReLU()] * 400)``:
1.7 GB of linear weights around 6.6 MB of BatchNorm tensors. ``scale=2`` doubles every linear weight (so the
non-BatchNorm bytes double and the BatchNorm layers and tensor count stay the same).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS = 400
WIDTH = 1024
# the exported model: 400 BatchNorm2d layers between 3x3 convolutions of 256 channels (944 MB of weights)
CONV_CHANNELS = 256


def cache_dir() -> Path:
    folder = Path(os.environ.get("BNCHECK_BENCH_CACHE", Path.home() / ".cache" / "bncheck-bench"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def big_state_dict(*, layers: int = LAYERS, width: int = WIDTH, scale: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        linear, norm = 3 * i, 3 * i + 1
        # zeros cost nothing to make; bncheck and every baseline read only the BatchNorm tensors' values
        state[f"{linear}.weight"] = torch.zeros(width, width * scale)
        state[f"{linear}.bias"] = torch.zeros(width)
        state.update(healthy_batchnorm(f"{norm}", width, generator))
    return state


def healthy_batchnorm(prefix: str, channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One BatchNorm layer's state under ``prefix``: unit weight, zero bias, statistics that differ per layer."""
    return {
        f"{prefix}.weight": torch.ones(channels),
        f"{prefix}.bias": torch.zeros(channels),
        f"{prefix}.running_mean": torch.randn(channels, generator=generator) * 0.1,
        f"{prefix}.running_var": torch.rand(channels, generator=generator) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1000),
    }


def deep_bn_model(*, layers: int = LAYERS, channels: int = CONV_CHANNELS) -> torch.nn.Module:
    """``layers`` x (Conv2d 3x3, BatchNorm2d, ReLU) in eval mode, for the export benchmarks: large convolutions
    around small BatchNorm tensors, with statistics that differ per layer."""
    generator = torch.Generator().manual_seed(0)
    blocks: list[torch.nn.Module] = []
    with torch.no_grad():
        for _ in range(layers):
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            conv.weight.zero_()  # the readers under test never read it; zeros cost nothing to make
            norm = torch.nn.BatchNorm2d(channels)
            norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            norm.num_batches_tracked.fill_(1000)
            blocks += [conv, norm, torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks).eval()


def deep_onnx(folder: Path | None = None) -> dict[str, Path]:
    """:func:`deep_bn_model` exported to ONNX for inference, written on first use: ``external`` keeps every tensor
    of 1 KiB or more (each BatchNorm tensor too) in ``deep-conv.onnx.data`` beside the model, as exporters do for
    large models; ``embedded`` holds them all in the one file. The TorchScript-based exporter with constant folding
    off, which keeps the BatchNormalization nodes (folding merges each into the convolution before it). Its
    deduplication pass would share equal tensors between layers, so each layer's weights get values of their own
    (a constant per tensor, as cheap as the zeros)."""
    import contextlib
    import io
    import warnings

    import onnx

    folder = folder or cache_dir()
    paths = {"external": folder / "deep-conv.onnx", "embedded": folder / "deep-conv-embedded.onnx"}
    if all(path.exists() for path in paths.values()):
        return paths
    embedded = paths["embedded"].with_name(paths["embedded"].name + ".partial")
    network = deep_bn_model()
    with torch.no_grad():
        for index, parameter in enumerate(network.parameters()):
            parameter.fill_(1.0 + index * 1e-4)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        example = torch.zeros(1, CONV_CHANNELS, 4, 4)
        torch.onnx.export(network, (example,), str(embedded), dynamo=False, do_constant_folding=False)
    model = onnx.load(str(embedded))
    external = paths["external"].with_name(paths["external"].name + ".partial")
    onnx.save_model(
        model, str(external), save_as_external_data=True, location="deep-conv.onnx.data", size_threshold=1024
    )
    embedded.replace(paths["embedded"])
    external.replace(paths["external"])
    return paths


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in names[k * per : (k + 1) * per]}, str(folder / shard))
        weight_map.update(dict.fromkeys(names[k * per : (k + 1) * per], shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def big_checkpoints(
    folder: Path | None = None, *, scale: int = 1, formats: tuple[str, ...] = ("pt", "safetensors", "sharded")
) -> dict[str, Path]:
    """The large checkpoint in each format, written on first use."""
    folder = folder or cache_dir()
    tag = "" if scale == 1 else f"-x{scale}"
    paths = {
        "pt": folder / f"big{tag}.pt",
        "safetensors": folder / f"big{tag}.safetensors",
        "sharded": folder / f"big{tag}-sharded" / "model.safetensors.index.json",
    }
    wanted = {name: paths[name] for name in formats}
    if all(path.exists() for path in wanted.values()):
        return wanted
    state = big_state_dict(scale=scale)
    for name, path in wanted.items():
        if path.exists():
            continue
        temp = path.with_name(path.name + ".partial")
        if name == "pt":
            torch.save(state, temp)
            temp.replace(path)
        elif name == "safetensors":
            save_file(state, str(temp))
            temp.replace(path)
        else:
            save_sharded(state, path.parent)
    return wanted


def exported_checkpoint(folder: Path | None = None) -> Path:
    """``deep_bn_model()`` exported with ``torch.export.export`` and saved with ``torch.export.save`` (.pt2, 944 MB
    of convolution weights in their own records beside 400 BatchNorm layers' statistics), written on first use."""
    path = (folder or cache_dir()) / "deep-bn.pt2"
    if path.exists():
        return path
    program = torch.export.export(deep_bn_model(), (torch.randn(1, CONV_CHANNELS, 4, 4),))
    # written under its own name (the archive's folder is named after the file) in a folder beside it, then moved
    partial = path.parent / "deep-bn.partial"
    partial.mkdir(exist_ok=True)
    torch.export.save(program, partial / path.name)
    (partial / path.name).replace(path)
    partial.rmdir()
    return path


def small_checkpoints(folder: Path | None = None, count: int = 200) -> Path:
    """``count`` small checkpoints (a few BatchNorm MLPs, a few saving styles) in one folder."""
    target = (folder or cache_dir()) / f"small-{count}"
    if target.exists() and len(list(target.iterdir())) == count:
        return target
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for i in range(count):
        width = 16 + 8 * (i % 5)
        model = torch.nn.Sequential(
            torch.nn.Linear(10, width),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.BatchNorm1d(width),
        )
        model.train()
        model(torch.randn(32, 10))
        if i % 2:
            save_file(model.state_dict(), str(target / f"model-{i:03d}.safetensors"))
        else:
            torch.save({"model": model.state_dict(), "epoch": i}, target / f"model-{i:03d}.pt")
    return target


def many_layer_state_dict(layers: int, channels: int = 64) -> dict[str, torch.Tensor]:
    """``layers`` BatchNorm layers of ``channels`` and nothing else (``layers.{i}.bn.*``), healthy statistics that
    differ per layer: the shape of a state dict whose inspection cost is all per-layer overhead."""
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        state.update(healthy_batchnorm(f"layers.{i}.bn", channels, generator))
    return state


def many_layer_checkpoints(layers: int, folder: Path | None = None) -> dict[str, Path]:
    """``many_layer_state_dict(layers)`` as .pt and .safetensors, written on first use."""
    folder = folder or cache_dir()
    paths = {"pt": folder / f"m{layers}.pt", "safetensors": folder / f"m{layers}.safetensors"}
    if all(path.exists() for path in paths.values()):
        return paths
    state = many_layer_state_dict(layers)
    for name, path in paths.items():
        temp = path.with_name(path.name + ".partial")
        if name == "pt":
            torch.save(state, temp)
        else:
            save_file(state, str(temp))
        temp.replace(path)
    return paths
