"""torch.export archives (.pt2): read like torch.export.load, every BatchNorm call's mode and settings recorded,
BN019 on training-mode exports only, diff against the source checkpoint, and hostile or broken archives."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAD, GOOD
from test_hostile import Payload
from test_loaders import assert_same_tensor, every_dtype_and_view
from torch import nn

from bncheck.loaders import open_checkpoint

FIXTURES = sorted(GOOD.glob("*.pt2")) + sorted(BAD.glob("*.pt2"))


def assert_reads_like_torch_export_load(path: Path) -> int:
    """Every parameter, buffer and constant torch.export.load gives, in its order, with bncheck's dtype, shape and
    values; returns how many were compared."""
    program = torch.export.load(path)
    theirs = {**program.state_dict, **program.constants}
    ours = open_checkpoint(path).root
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert_same_tensor(ours[name], tensor, name)
    return len(theirs)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixtures_read_like_torch_export_load(path: Path) -> None:
    assert assert_reads_like_torch_export_load(path) >= 10


def test_every_dtype_and_shared_strided_view_reads_like_torch_export_load(tmp_path: Path) -> None:
    # views of one base share a storage: torch.export.save writes it once and each buffer views it
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, tensor in every_dtype_and_view().items():
                self.register_buffer(name.replace(".", "_"), tensor)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    path = tmp_path / "views.pt2"
    torch.export.save(torch.export.export(Holder().eval(), (torch.randn(2, 3),)), path)
    assert assert_reads_like_torch_export_load(path) == len(every_dtype_and_view()) + 5


class Net(nn.Module):
    """A convolution, a BatchNorm2d with its own momentum and eps inside a Sequential, one without affine
    parameters, and one without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.block = nn.Sequential(nn.BatchNorm2d(4, momentum=0.3, eps=1e-3), nn.ReLU())
        self.plain = nn.BatchNorm2d(4, affine=False)
        self.untracked = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.untracked(self.plain(self.block(self.conv(x))))


def trained_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net


def export(model: nn.Module, path: Path, *, variant: str = "export", example: torch.Tensor | None = None) -> Path:
    example = torch.randn(2, 3, 6, 6) if example is None else example
    program = torch.export.export(model, (example,), strict=variant == "strict")
    if variant == "core_aten":
        with pytest.warns(FutureWarning, match="LeafSpec"):  # torch's own deprecation, met inside run_decompositions
            program = program.run_decompositions()
    torch.export.save(program, path)
    return path


def graph_targets(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        nodes = json.loads(archive.read(name))["graph_module"]["graph"]["nodes"]
    return {node["target"] for node in nodes if "batch_norm" in node["target"]}


# the ops torch 2.13 writes for each export path and mode (checked below, so a torch change is noticed)
OPS = {
    ("eval", "export"): {"torch.ops.aten.batch_norm.default"},
    ("eval", "strict"): {"torch.ops.aten.batch_norm.default"},
    ("eval", "core_aten"): {
        "torch.ops.aten._native_batch_norm_legit_no_training.default",
        "torch.ops.aten._native_batch_norm_legit.no_stats",
    },
    ("train", "export"): {"torch.ops.aten.batch_norm.default"},
    ("train", "strict"): {"torch.ops.aten.batch_norm.default"},
    ("train", "core_aten"): {
        "torch.ops.aten._native_batch_norm_legit_functional.default",
        "torch.ops.aten._native_batch_norm_legit.no_stats",
    },
}


@pytest.mark.parametrize(("mode", "variant"), sorted(OPS))
def test_each_call_records_its_mode_momentum_and_eps(cli, tmp_path: Path, mode: str, variant: str) -> None:
    net = trained_net()
    getattr(net, mode)()
    path = export(net, tmp_path / f"{mode}-{variant}.pt2", variant=variant)
    assert graph_targets(path) == OPS[mode, variant]
    calls = {call.layer: dict(call.arguments) for call in open_checkpoint(path).calls}
    training = mode == "train"
    assert calls == {
        "block.0": {"training": training, "momentum": 0.3, "eps": 1e-3},
        "plain": {"training": training, "momentum": 0.1, "eps": 1e-5},
        # no statistics: normalised with the batch in any mode, named by its affine parameters
        "untracked": {"training": True, "momentum": 0.1, "eps": 1e-5},
    }
    (file,) = cli("inspect", path, "--json").json()["files"]
    assert [layer["name"] for layer in file["layers"]] == ["block.0", "plain"]
    assert [(f["code"], f["layer"]) for f in file["findings"]] == (
        [("BN019", "block.0"), ("BN019", "plain")] if training else []
    )
    for layer in file["layers"]:
        assert layer["configuration"]["training"] == {"value": training, "source": "torch.export batch_norm call"}


def test_momentum_none_exported_in_eval_is_no_momentum_of_zero(cli, tmp_path: Path) -> None:
    # BatchNorm with momentum=None (a cumulative average) passes 0.0 to the kernel in eval mode, which ignores it
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))
    path = export(model.eval(), tmp_path / "cumulative.pt2", example=torch.randn(2, 3))
    (file,) = cli("inspect", path, "--json", "--fail-on", "info").json()["files"]
    assert file["findings"] == []
    assert [layer["configuration"]["momentum"] for layer in file["layers"]] == [
        None,
        {"value": 0.1, "source": "torch.export batch_norm call"},
    ]


def test_calls_inside_control_flow_are_named_by_their_module(tmp_path: Path) -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.other = nn.BatchNorm1d(4, eps=0.01)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda x: self.bn(x), lambda x: self.other(x) * 2, (x,))

    path = export(Branches().eval(), tmp_path / "cond.pt2", example=torch.randn(3, 4))
    calls = {call.layer: dict(call.arguments) for call in open_checkpoint(path).calls}
    assert calls == {
        "bn": {"training": False, "momentum": 0.1, "eps": 1e-5},
        "other": {"training": False, "momentum": 0.1, "eps": 0.01},
    }


def test_the_shipped_exports_inspect_as_the_issue_asks(cli) -> None:
    result = cli("inspect", GOOD, BAD, "--json")
    files = {Path(f["path"]).name: f for f in result.json()["files"] if f["path"].endswith(".pt2")}
    assert set(files) == {p.name for p in FIXTURES}
    for name, file in files.items():
        assert file["format"] == "torch export" and file["error"] is None
        assert len(file["layers"]) == 2
        assert ("BN019" in {f["code"] for f in file["findings"]}) == name.startswith("BN019")
    assert [layer["dtype"] for layer in files["mlp-export-fp16.pt2"]["layers"]] == ["float16", "float16"]


@pytest.mark.parametrize(
    ("source", "export_name"),
    [
        ("mlp-state-dict.pt", "mlp-export-fp16.pt2"),  # fp16 rounding is no drift
        ("conv1d.safetensors", "conv1d-export.pt2"),
        ("conv1d.safetensors", "conv1d-export-core-aten.pt2"),
    ],
)
def test_diff_of_a_faithful_export_against_its_checkpoint_finds_no_drift(cli, source: str, export_name: str) -> None:
    result = cli("diff", GOOD / source, GOOD / export_name, "--json")
    assert result.exit_code == 0, result.stdout
    document = result.json()
    assert document["b"]["format"] == "torch export"
    assert (document["only_in_a"], document["only_in_b"], document["channel_changes"]) == ([], [], [])
    assert len(document["layers"]) == 2 and not any(layer["drifted"] for layer in document["layers"])


def test_diff_reports_the_layer_an_export_folded_and_the_one_it_changed(cli, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    model(torch.randn(8, 3, 8, 8))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    folded = torch.ao.quantization.fuse_modules(model, [["0", "1"]])  # the first BatchNorm folded into its conv
    with torch.no_grad():
        folded[4].running_var.mul_(3)  # and the second one's statistics changed on the way
    export(folded, tmp_path / "folded.pt2", example=torch.randn(2, 3, 8, 8))
    result = cli("diff", tmp_path / "model.pt", tmp_path / "folded.pt2", "--json")
    assert result.exit_code == 1
    document = result.json()
    # the fused layer is found in the convolution's weight and bias, by value, and with A's statistics
    assert document["only_in_a"] == []
    assert [(f["name_a"], f["feeder_a"], f["weight_b"], f["faithful"]) for f in document["folded"]] == [
        ("1", "0", "0.weight", True)
    ]
    assert [(layer["name_a"], layer["drifted"]) for layer in document["layers"]] == [("4", True)]


def test_a_torch_export_archive_is_told_from_a_torch_save_file_by_its_contents(tmp_path: Path) -> None:
    renamed = tmp_path / "model.pt"
    renamed.write_bytes((GOOD / "conv1d-export.pt2").read_bytes())
    checkpoint = open_checkpoint(renamed)
    assert checkpoint.format == "torch export"
    assert checkpoint.notes == ("named .pt but its bytes are a torch.export archive; read as what the bytes say",)
    saved = tmp_path / "model.pt2"
    saved.write_bytes((GOOD / "mlp-state-dict.pt").read_bytes())
    assert open_checkpoint(saved).format == "torch zip"
    assert "named .pt2 but its bytes are a torch.save file" in open_checkpoint(saved).notes[0]


def rewrite(source: Path, target: Path, edit: dict[str, bytes | None]) -> Path:
    """A copy of an archive with members replaced, added or (None) dropped, named below its folder."""
    with zipfile.ZipFile(source) as src:
        prefix = src.namelist()[0].split("/")[0] + "/"
        members = {info.filename: src.read(info) for info in src.infolist()}
    for name, data in edit.items():
        members[prefix + name] = data  # type: ignore[assignment]
    with zipfile.ZipFile(target, "w") as dst:
        for name, data in members.items():
            if data is not None:
                dst.writestr(name, data)
    return target


def member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(archive.namelist()[0].split("/")[0] + "/" + name)


def test_an_archive_holding_a_torch_save_pickle_is_read_as_the_torch_save_file(tmp_path: Path) -> None:
    # torch.load would unpickle data.pkl whatever else the archive holds: its globals must be graded
    with zipfile.ZipFile(GOOD / "mlp-state-dict.pt") as saved:
        pickled = {info.filename.split("/", 1)[1]: saved.read(info) for info in saved.infolist()}
    both = rewrite(GOOD / "conv1d-export.pt2", tmp_path / "both.pt2", {**pickled})
    assert open_checkpoint(both).format == "torch zip"


def test_a_pickle_named_first_but_not_in_the_directory_is_refused(cli, tmp_path: Path) -> None:
    # torch.save writes data.pkl first, so a zip whose first local header names it is taken for torch.save's without
    # reading the directory; when the directory then names the member otherwise, the file is refused, not misread
    path = tmp_path / "first.pt2"
    with zipfile.ZipFile(GOOD / "conv1d-export.pt2") as source, zipfile.ZipFile(path, "w") as target:
        target.writestr("conv1d-export/data.pkl", pickle.dumps({}, protocol=2))
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    name, data = b"conv1d-export/data.pkl", path.read_bytes()
    assert data.count(name) == 2  # in its local header, then in its directory entry
    at = data.index(name, data.index(name) + 1)
    path.write_bytes(data[:at] + b"conv1d-export/data.pkx" + data[at + len(name) :])
    result = cli("inspect", path, "--json")
    assert result.exit_code == 2
    assert result.json()["files"][0]["error"]["message"] == "archive member conv1d-export/data.pkl is missing"


def test_weights_in_the_legacy_single_file_read_like_torch_export_load(tmp_path: Path) -> None:
    # data/weights/model.pt, one torch.save of the whole state dict, which torch.export.load still reads
    state = torch.export.load(GOOD / "conv1d-export.pt2").state_dict
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    edit: dict[str, bytes | None] = {f"data/weights/weight_{index}": None for index in range(len(state))}
    edit |= {"data/weights/model_weights_config.json": None, "data/weights/model.pt": buffer.getvalue()}
    path = rewrite(GOOD / "conv1d-export.pt2", tmp_path / "legacy.pt2", edit)
    with zipfile.ZipFile(path) as archive:
        assert [n for n in archive.namelist() if "/data/weights/" in n] == ["conv1d-export/data/weights/model.pt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the legacy layout is deprecated
        assert assert_reads_like_torch_export_load(path) == len(state)


def aoti_package(tmp_path: Path) -> Path:
    """What torch._inductor.aoti_compile_and_package writes (it calls package_pt2 with the compiled files: checked
    with a real compilation, which takes half a minute): compiled code and its metadata in data/aotinductor/model/,
    no program."""
    from torch.export.pt2_archive._package import package_pt2

    files = []
    for name in ("model.wrapper.cpp", "model.wrapper_metadata.json", "model.wrapper.so"):
        (tmp_path / name).write_bytes(b"\x7fELF" if name.endswith(".so") else b"{}")
        files.append(str(tmp_path / name))
    return package_pt2(tmp_path / "aoti.pt2", aoti_files=files)


def test_an_aoti_package_is_a_one_line_error(cli, tmp_path: Path) -> None:
    result = cli("inspect", aoti_package(tmp_path), "--json")
    assert result.exit_code == 2
    message = result.json()["files"][0]["error"]["message"]
    assert message.startswith("an AOTInductor package (compiled code in data/aotinductor/)") and "\n" not in message


BROKEN: dict[str, tuple[dict[str, bytes | None], str]] = {
    "no program": ({"models/model.json": None}, "a .pt2 archive without a serialized program"),
    "another format": ({"archive_format": b"zip"}, "archive_format record says 'zip', not 'pt2'"),
    "another version": ({"archive_version": b"1"}, "archive_version '1'"),
    "no weights config": ({"data/weights/model_weights_config.json": None}, "model_weights_config.json is missing"),
    "a weight record missing": ({"data/weights/weight_1": None}, "names data/weights/weight_1, which is missing"),
    "a program that is not JSON": ({"models/model.json": b"{"}, "models/model.json is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_archive_torch_export_load_cannot_read_is_a_one_line_error(cli, tmp_path: Path, case: str) -> None:
    edit, message = BROKEN[case]
    result = cli("inspect", rewrite(GOOD / "conv1d-export.pt2", tmp_path / "broken.pt2", edit), "--json")
    assert result.exit_code == 2
    error = result.json()["files"][0]["error"]
    assert message in error["message"] and "\n" not in error["message"]


def weights_config(path: Path) -> dict:
    return json.loads(member(path, "data/weights/model_weights_config.json"))


def record_of(path: Path, name: str) -> str:
    return "data/weights/" + weights_config(path)["config"][name]["path_name"]


def test_an_empty_record_holds_no_data_and_a_ragged_one_is_refused(cli, tmp_path: Path) -> None:
    source = GOOD / "conv1d-export.pt2"
    record = record_of(source, "features.1.running_var")
    empty = rewrite(source, tmp_path / "empty.pt2", {record: b""})
    assert not torch.export.load(empty).state_dict["features.1.running_var"].any()  # torch makes it up: zeros
    (file,) = cli("inspect", empty, "--json").json()["files"]
    assert [(f["code"], f["layer"]) for f in file["findings"]] == [("BN018", "features.1")]
    ragged = rewrite(source, tmp_path / "ragged.pt2", {record: member(source, record) + b"\0"})
    with pytest.raises(ValueError, match="not a multiple of element size"):
        torch.export.load(ragged)
    error = cli("inspect", ragged, "--json").json()["files"][0]["error"]
    assert error["message"].endswith("its 65-byte record is not whole float32 elements")


def with_pickled_weight(source: Path, target: Path, payload: object) -> Path:
    """The archive with bn's running_var stored as a pickle (as torch stores a tensor subclass)."""
    config = weights_config(source)
    entry = next(v for k, v in config["config"].items() if k.endswith("1.running_var"))
    entry.update(use_pickle=True, path_name="weight_pickled", tensor_meta=None)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    edit = {"data/weights/model_weights_config.json": json.dumps(config).encode()}
    return rewrite(source, target, {**edit, "data/weights/weight_pickled": buffer.getvalue()})


def with_opaque_constant(source: Path, target: Path, payload: object) -> Path:
    config = {"config": {"hook": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}}}
    config["config"]["hook"]["tensor_meta"] = None
    edit = {"data/constants/model_constants_config.json": json.dumps(config).encode()}
    return rewrite(source, target, {**edit, "data/constants/opaque_obj_0": pickle.dumps(payload, protocol=2)})


def with_sample_inputs(source: Path, target: Path, payload: object) -> Path:
    buffer = io.BytesIO()
    torch.save(((payload,), {}), buffer)
    return rewrite(source, target, {"data/sample_inputs/model.pt": buffer.getvalue()})


@pytest.mark.parametrize("place", [with_sample_inputs, with_pickled_weight, with_opaque_constant])
def test_a_payload_torch_export_load_would_run_is_flagged_and_never_run(cli, tmp_path: Path, place) -> None:
    # the payload is live: torch.export.load runs it (sample inputs fall back to weights_only=False)
    armed = tmp_path / "armed"
    path = place(GOOD / "conv1d-export.pt2", tmp_path / "hostile.pt2", Payload(os.system, f"touch {armed}"))
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")  # torch warns about the fallbacks it takes on the way
        torch.export.load(path)  # fails after the payload ran: the program is rebuilt around what it returned
    assert armed.exists()
    marker = tmp_path / "marker"
    path = place(GOOD / "conv1d-export.pt2", tmp_path / "hostile.pt2", Payload(os.system, f"touch {marker}"))
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    (file,) = result.json()["files"]
    assert file["error"] is None and len(file["layers"]) == 2
    (finding,) = [f for f in file["findings"] if f["code"] == "BN101"]
    assert "posix.system" in finding["message"]


# The peak RSS of this process's memory since exec (VmHWM): ru_maxrss would include the pytest process it forked from.
PROBE = """
import json, sys
from bncheck.cli import run
code = run(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps([code, int(status["VmHWM"].split()[0]) / 1024]), file=sys.stderr)
"""


def inspect_in_a_process(path: Path) -> tuple[int, dict, float, float]:
    """``bncheck inspect --json`` in a process of its own: exit code, the file's report, seconds, peak RSS in MiB."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "inspect", "--json", str(path)], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    code, peak = json.loads(result.stderr.strip().splitlines()[-1])
    return code, json.loads(result.stdout)["files"][0], seconds, peak


def edited_meta(path: Path, target: Path, **meta: object) -> Path:
    """The archive with features.1.running_var's tensor metadata changed."""
    config = weights_config(path)
    config["config"]["features.1.running_var"]["tensor_meta"].update(meta)
    return rewrite(path, target, {"data/weights/model_weights_config.json": json.dumps(config).encode()})


def nested_graphs(depth: int) -> bytes:
    graph: dict = {"nodes": []}
    for _ in range(depth):
        argument = {"as_graph": {"name": "branch", "graph": graph}}
        graph = {"nodes": [{"target": "torch.ops.higher_order.cond", "inputs": [{"name": "true_fn", "arg": argument}]}]}
    return json.dumps({"graph_module": {"graph": graph, "signature": {"input_specs": []}}}).encode()


def big_deflated(path: Path, target: Path) -> Path:
    """The program padded with 65 MiB of whitespace, deflated to a few KiB (torch's reader inflates it)."""
    rewrite(path, target, {})
    program = member(path, "models/model.json") + b" " * (65 * 1024 * 1024)
    with zipfile.ZipFile(target, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(archive.namelist()[0].split("/")[0] + "/models/big.json", program)
    return target


def huge_size(path: Path, target: Path) -> Path:
    """A size of 5,000 digits, beyond what Python's int() accepts from a string."""
    config = member(path, "data/weights/model_weights_config.json")
    config = config.replace(b'"as_int": 16', b'"as_int": ' + b"9" * 5000)
    return rewrite(path, target, {"data/weights/model_weights_config.json": config})


HOSTILE = {
    "a program nested 100,000 deep": (
        lambda p, t: rewrite(p, t, {"models/model.json": b'{"graph_module":' + b"[" * 100_000 + b"]" * 100_000 + b"}"}),
        "nests too deeply",
    ),
    "graphs nested 20 deep": (lambda p, t: rewrite(p, t, {"models/model.json": nested_graphs(20)}), "16 deep"),
    "a 65 MiB program": (big_deflated, "models/big.json declares 68176729 bytes: more than bncheck parses"),
    "a program of 3 million empty objects": (
        lambda p, t: rewrite(p, t, {"models/model.json": b"[" + b"{}," * 3_000_000 + b"{}]"}),
        "opens 3000002 objects and lists: more than bncheck parses (2097152)",
    ),
    "a program of 2 million empty objects": (
        lambda p, t: rewrite(p, t, {"models/model.json": b"[" + b"{}," * 2_000_000 + b"{}]"}),
        "models/model.json is not a JSON object",
    ),
    "a 5,000-digit size": (huge_size, "model_weights_config.json is not valid JSON"),
    "a 4,000-digit size": (
        lambda p, t: edited_meta(p, t, sizes=[{"as_int": int("9" * 4000)}]),
        "size is not a concrete non-negative integer",
    ),
    "a view of 2**124 elements": (
        lambda p, t: edited_meta(p, t, sizes=[{"as_int": 2**62}] * 2, strides=[{"as_int": 1}] * 2),
        "repeats 9223372036854775807 stored element(s)",
    ),
    "a view past its record": (
        lambda p, t: edited_meta(p, t, storage_offset={"as_int": 1}),
        "tensor of size (16,) at offset 1 reaches past its 64-byte storage",
    ),
    "a stride-0 view of 2**40 elements": (
        lambda p, t: edited_meta(p, t, sizes=[{"as_int": 2**40}], strides=[{"as_int": 0}]),
        "repeats 1 stored element(s)",
    ),
    "a symbolic size": (
        lambda p, t: edited_meta(p, t, sizes=[{"as_expr": {"expr_str": f"__import__('os').system('touch {t}.ran')"}}]),
        "is not a concrete non-negative integer",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_end_in_one_line_within_bounds(tmp_path: Path, case: str) -> None:
    make, message = HOSTILE[case]
    path = make(GOOD / "conv1d-export.pt2", tmp_path / "hostile.pt2")
    code, file, seconds, peak_mib = inspect_in_a_process(path)
    assert code == 2 and message in file["error"]["message"] and "\n" not in file["error"]["message"]
    assert seconds < 10 and peak_mib < 300  # 2 million empty objects parse into 180 MiB
    assert not Path(f"{path}.ran").exists()


def test_symbolic_shapes_are_never_parsed(cli, tmp_path: Path) -> None:
    # torch.export.load hands each symbolic size of the program to sympy.sympify, which evaluates it as Python
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    program = torch.export.export(model, (torch.randn(4, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "dynamic.pt2")
    text = member(tmp_path / "dynamic.pt2", "models/model.json").decode()
    assert '"expr_str": "Symbol(' in text

    def armed(marker: Path) -> Path:
        payload = f"__import__('os').system('touch {marker}') + Symbol("
        edit = {"models/model.json": text.replace("Symbol(", payload, 1).encode()}
        return rewrite(tmp_path / "dynamic.pt2", tmp_path / "hostile.pt2", edit)

    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        torch.export.load(armed(tmp_path / "armed"))
    assert (tmp_path / "armed").exists()
    result = cli("inspect", armed(tmp_path / "marker"), "--json")
    assert not (tmp_path / "marker").exists()
    assert result.exit_code == 0 and [layer["name"] for layer in result.json()["files"][0]["layers"]] == ["1"]


def test_recalibrate_writes_the_new_statistics_into_the_archive_in_place(cli, tmp_path: Path) -> None:
    data = tmp_path / "digits-like.npy"
    np.save(data, np.random.default_rng(0).normal(size=(256, 8, 8)).astype(np.float32))
    source, out = GOOD / "conv1d-export.pt2", tmp_path / "recalibrated.pt2"
    model = f"{GOOD.parent / 'make_fixtures.py'}:ConvNet1d"
    assert cli("recalibrate", source, "--model", model, "--data", data, "-o", out).exit_code == 0
    a, b = source.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    stats_bytes = 2 * (16 + 16) * 4 + 2 * 8  # two layers: mean and var float32, counters int64
    assert 0 < sum(x != y for x, y in zip(a, b, strict=True)) <= stats_bytes + 64  # and the CRC fields
    before, after = torch.export.load(source).state_dict, torch.export.load(out).state_dict
    assert int(after["features.1.num_batches_tracked"]) == 4  # 256 samples in batches of 64
    assert not torch.equal(before["features.1.running_var"], after["features.1.running_var"])
    assert assert_reads_like_torch_export_load(out) == len(after)
