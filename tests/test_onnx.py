"""ONNX models: the reader against onnx.load on real exports, the mode, momentum and eps each BatchNormalization node
records, BN019 and what ONNX Runtime does with such a node, external data inside and outside the model's folder,
and diff against the checkpoint an export came from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import BAD, FIXTURES, GOOD
from onnx import TensorProto, helper, numpy_helper

from bncheck.api import inspect_file
from bncheck.errors import CorruptCheckpointError
from bncheck.loaders import find_checkpoints, open_checkpoint
from bncheck.loaders.onnx import _pytorch_momentum

sys.path.insert(0, str(FIXTURES))
import make_fixtures  # the fixture generator: its models, data and export helper

ONNX_FIXTURES = [p for p in find_checkpoints(GOOD) + find_checkpoints(BAD) if p.suffix == ".onnx"]
LEAVES = ("weight", "bias", "running_mean", "running_var")


def resolved_initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    """What a node input stands for, as onnx's own objects say: an initializer, through Identity nodes."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    identities = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Identity"}
    while name not in initializers:
        name = identities[name]
    return initializers[name]


@pytest.mark.parametrize("path", ONNX_FIXTURES, ids=lambda p: p.name)
def test_the_reader_gives_what_onnx_load_gives(path: Path) -> None:
    checkpoint = open_checkpoint(path)
    model = onnx.load(str(path))  # external data included
    nodes = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    assert len(checkpoint.calls) == len(nodes) == 2
    for node, call in zip(nodes, checkpoint.calls, strict=True):
        for leaf, name in zip(LEAVES, node.input[1:], strict=True):
            ref = checkpoint.root[f"{call.layer}.{leaf}"]
            expected = numpy_helper.to_array(resolved_initializer(model, name))
            assert (ref.dtype, ref.shape) == (str(expected.dtype), expected.shape), (call.layer, leaf)
            np.testing.assert_array_equal(ref.read(), expected)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        arguments = dict(call.arguments)
        assert arguments["eps"] == pytest.approx(attributes["epsilon"], rel=1e-6)
        assert arguments["momentum"] == pytest.approx(1 - attributes["momentum"], rel=1e-5)
    # the other tensors it lists are the model's weights, by their names
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for name, ref in checkpoint.root.items():
        if name in initializers:
            np.testing.assert_array_equal(ref.read(), numpy_helper.to_array(initializers[name]))


def test_layers_are_named_as_the_checkpoint_names_them(cli) -> None:
    expected = {
        "mlp-onnx-eval.onnx": ["net.1", "net.4"],
        "mlp-onnx-fp16.onnx": ["net.1", "net.4"],
        "conv1d-onnx-dynamo.onnx": ["features.1", "features.4"],
    }
    for name, layers in expected.items():
        file = cli("inspect", GOOD / name, "--json").json()["files"][0]
        assert [layer["name"] for layer in file["layers"]] == layers, name
        assert file["format"] == "onnx"
    # the dynamo export's weights are in the .onnx.data file beside it: its size counts
    dynamo = cli("inspect", GOOD / "conv1d-onnx-dynamo.onnx", "--json").json()["files"][0]
    beside = GOOD / "conv1d-onnx-dynamo.onnx.data"
    assert dynamo["size_bytes"] == (GOOD / "conv1d-onnx-dynamo.onnx").stat().st_size + beside.stat().st_size
    assert [layer["kind"] for layer in dynamo["layers"]] == ["BatchNorm1d", "BatchNorm1d"]  # from the Conv1d weights


def test_onnx_momentum_is_the_weight_of_the_running_value() -> None:
    # onnx.defs: running_mean = input_mean * momentum + current_mean * (1 - momentum), default 0.9
    schema = onnx.defs.get_schema("BatchNormalization")
    assert "running_mean = input_mean * momentum + current_mean * (1 - momentum)" in schema.doc
    assert schema.attributes["momentum"].default_value.f == pytest.approx(0.9)
    # stored as float32: torch's 1 - 0.1 is 0.8999999762, and comes back as PyTorch's 0.1 exactly
    assert _pytorch_momentum(float(np.float32(0.9))) == 0.1
    assert _pytorch_momentum(float(np.float32(0.01))) == 0.99
    assert _pytorch_momentum(1.0) == 0.0


def test_bn019_on_the_training_mode_exports_and_on_none_of_the_eval_ones(cli) -> None:
    for path in ONNX_FIXTURES:
        file = cli("inspect", path, "--json").json()["files"][0]
        codes = {finding["code"] for finding in file["findings"]}
        assert ("BN019" in codes) == path.name.startswith("BN019"), path.name
        training = {layer["configuration"]["training"]["value"] for layer in file["layers"]}
        assert training == {path.name.startswith("BN019")}, path.name
    sources = {
        "BN019-onnx-training-mode.onnx": "ONNX BatchNormalization node (training_mode=1, 3 outputs)",
        "BN019-onnx-training-outputs-opset12.onnx": "ONNX BatchNormalization node (5 outputs)",
    }
    for name, source in sources.items():
        layer = cli("inspect", BAD / name, "--json").json()["files"][0]["layers"][0]
        assert layer["configuration"]["training"]["source"] == source


def ort_outputs(path: Path, features: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"features": features})
    return output


@pytest.mark.parametrize("name", ["BN019-onnx-training-mode.onnx", "BN019-onnx-training-outputs-opset12.onnx"])
def test_onnx_runtime_normalises_a_training_mode_export_with_each_batch(name: str) -> None:
    x, _ = make_fixtures.cancer_data()
    batch = x[:32].numpy()
    evaluated = ort_outputs(GOOD / "mlp-onnx-eval.onnx", batch)
    trained = ort_outputs(BAD / name, batch)
    # the eval export computes what the checkpoint computes in eval()
    model = make_fixtures.MLP()
    model.load_state_dict(torch.load(GOOD / "mlp-state-dict.pt", weights_only=True))
    with torch.no_grad():
        np.testing.assert_allclose(evaluated, model.eval()(x[:32]).numpy(), rtol=1e-4, atol=1e-5)
    # the training export does not, and a sample's output depends on the batch it came in
    assert np.abs(trained - evaluated).max() > 0.1
    np.testing.assert_allclose(ort_outputs(GOOD / "mlp-onnx-eval.onnx", batch[:4]), evaluated[:4], rtol=1e-5)
    assert np.abs(ort_outputs(BAD / name, batch[:4]) - trained[:4]).max() > 0.1


def bn_model(
    path: Path,
    *,
    opset: int,
    outputs: int = 1,
    attributes: dict[str, object] | None = None,
    prefix: str = "bn.",
    node_name: str = "bn_node",
    extra_nodes: tuple[onnx.NodeProto, ...] = (),
    stats: dict[str, str] | None = None,
    initializers: tuple[TensorProto, ...] | None = None,
) -> Path:
    """A one-node model: X -> BatchNormalization(scale, B, mean, var) -> Y, the four tensors as initializers named
    ``prefix`` + weight/bias/running_mean/running_var (or the input names ``stats`` gives)."""
    values = {
        "weight": np.ones(3, np.float32),
        "bias": np.zeros(3, np.float32),
        "running_mean": np.array([0.5, -1.0, 2.0], np.float32),
        "running_var": np.array([1.0, 4.0, 0.25], np.float32),
    }
    names = {leaf: (stats or {}).get(leaf, prefix + leaf) for leaf in LEAVES}
    if initializers is None:
        initializers = tuple(numpy_helper.from_array(values[leaf], names[leaf]) for leaf in LEAVES)
    node = helper.make_node(
        "BatchNormalization",
        ["X", *(names[leaf] for leaf in LEAVES)],
        ["Y", *(f"extra{i}" for i in range(outputs - 1))],
        name=node_name,
        **(attributes or {}),
    )
    graph = helper.make_graph(
        [*extra_nodes, node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 3])],
        initializer=list(initializers),
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


@pytest.mark.parametrize(
    ("opset", "outputs", "attributes", "evidence"),
    [
        (15, 1, {}, None),
        (15, 1, {"training_mode": 0}, None),
        (15, 1, {"training_mode": 1}, "training_mode=1"),
        (15, 3, {"training_mode": 1}, "training_mode=1, 3 outputs"),
        (15, 3, {}, "3 outputs"),  # invalid by the spec; ONNX Runtime decides by the outputs and trains
        (12, 5, {}, "5 outputs"),
        (9, 1, {}, None),
        (7, 5, {"spatial": 1}, "5 outputs"),
        (6, 1, {}, "is_test unset, so 0"),  # opsets 1-6: is_test defaults to 0, training
        (6, 1, {"is_test": 0}, "is_test=0"),
        (6, 1, {"is_test": 1}, None),
        (6, 5, {"is_test": 1}, None),  # at opsets 1-6 is_test decides
    ],
)
def test_the_mode_each_opset_records(tmp_path: Path, opset, outputs, attributes, evidence) -> None:
    path = bn_model(tmp_path / "bn.onnx", opset=opset, outputs=outputs, attributes=attributes)
    (call,) = open_checkpoint(path).calls
    assert dict(call.arguments)["training"] is (evidence is not None)
    expected_source = "ONNX BatchNormalization node" + (f" ({evidence})" if evidence else "")
    assert call.source == expected_source
    codes = [finding.code for finding in inspect_file(path).findings]
    assert codes == (["BN019"] if evidence else [])


def test_momentum_and_eps_as_recorded_or_by_the_operators_defaults(tmp_path: Path) -> None:
    keras = bn_model(tmp_path / "keras.onnx", opset=15, attributes={"momentum": 0.01, "epsilon": 1e-3})
    assert dict(open_checkpoint(keras).calls[0].arguments) == {"training": False, "eps": 0.001, "momentum": 0.99}
    assert [finding.code for finding in inspect_file(keras).findings] == ["BN014"]
    defaults = bn_model(tmp_path / "defaults.onnx", opset=15)
    assert dict(open_checkpoint(defaults).calls[0].arguments) == {"training": False, "eps": 1e-5, "momentum": 0.1}
    # eps passed where momentum was meant, as nn.BatchNorm1d(n, 0.9) does: BN015
    eps = bn_model(tmp_path / "eps.onnx", opset=15, attributes={"epsilon": 0.9})
    assert [finding.code for finding in inspect_file(eps).findings] == ["BN015"]
    # a training node whose statistics never move (ONNX momentum 1 is PyTorch 0): BN014 error beside BN019
    frozen = bn_model(tmp_path / "frozen.onnx", opset=15, attributes={"momentum": 1.0, "training_mode": 1})
    assert dict(open_checkpoint(frozen).calls[0].arguments)["momentum"] == 0.0
    assert sorted(finding.code for finding in inspect_file(frozen).findings) == ["BN014", "BN019"]


def test_a_momentum_none_layer_exported_for_inference_records_no_momentum(tmp_path: Path) -> None:
    # torch writes ONNX momentum 1 for momentum=None in eval mode (its factor is 0 there): not a BN014 finding
    model = make_fixtures.MLP(norm=lambda width: torch.nn.BatchNorm1d(width, momentum=None)).float()
    model.train()
    model(torch.randn(64, 30))
    path = tmp_path / "cumulative.onnx"
    make_fixtures.export_onnx(model.eval(), torch.randn(8, 30), path)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    assert {helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "momentum"} == {1.0}
    report = inspect_file(path)
    assert report.findings == ()
    assert all(layer.configuration.momentum is None for layer in report.layers)


def test_statistics_from_constants_through_identity_and_names_from_the_node(tmp_path: Path) -> None:
    mean = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32))
    extra = (
        helper.make_node("Constant", [], ["m"], value=mean),
        helper.make_node("Constant", [], ["v"], value_floats=[4.0, 5.0, 6.0]),
        helper.make_node("Identity", ["v"], ["v2"]),
        helper.make_node("Identity", ["v2"], ["v3"]),
    )
    initializers = (
        numpy_helper.from_array(np.full(3, 2.0, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(3, np.float32), "beta"),
    )
    stats = {"weight": "gamma", "bias": "beta", "running_mean": "m", "running_var": "v3"}
    path = bn_model(
        tmp_path / "tf.onnx", opset=13, node_name="block/bn", extra_nodes=extra, stats=stats, initializers=initializers
    )
    root = open_checkpoint(path).root
    np.testing.assert_array_equal(root["block/bn.running_mean"].read(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(root["block/bn.running_var"].read(), [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(root["block/bn.weight"].read(), [2.0, 2.0, 2.0])
    assert [layer.name for layer in inspect_file(path).layers] == ["block/bn"]


def test_statistics_computed_at_run_time_and_unused_ones_are_notes_not_layers(tmp_path: Path) -> None:
    unused = numpy_helper.from_array(np.ones(3, np.float32), "old.running_var")
    initializers = (
        numpy_helper.from_array(np.ones(3, np.float32), "bn.weight"),
        numpy_helper.from_array(np.zeros(3, np.float32), "bn.bias"),
        unused,
    )
    extra = (
        helper.make_node("ReduceMean", ["X"], ["bn.running_mean"], axes=[0], keepdims=0),
        helper.make_node("Identity", ["bn.running_mean"], ["bn.running_var"]),
    )
    path = bn_model(tmp_path / "computed.onnx", opset=15, extra_nodes=extra, initializers=initializers)
    report = inspect_file(path)
    assert report.error is None and report.layers == ()
    assert any("normalise with statistics the graph computes" in note and "bn" in note for note in report.notes)
    assert any("feed no BatchNormalization node (old.running_var)" in note for note in report.notes)


def conv_net() -> make_fixtures.ConvNet1d:
    from safetensors.torch import load_file

    model = make_fixtures.ConvNet1d().float()
    model.load_state_dict(load_file(GOOD / "conv1d.safetensors"))
    return model.eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_export_that_folded_its_batchnorms_has_nothing_to_check_and_diff_says_which(cli, tmp_path, dynamo) -> None:
    # the exporters' defaults in eval mode: constant folding (TorchScript-based) or optimize=True (dynamo)
    path = tmp_path / "folded.onnx"
    digits, _ = make_fixtures.digits_data()
    make_fixtures.export_onnx(conv_net(), digits[:16].float(), path, dynamo=dynamo)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0
    file = result.json()["files"][0]
    assert file["layers"] == [] and file["error"] is None
    assert any(note.startswith("no BatchNormalization node in the graph") for note in file["notes"])
    # folded is not dropped: each layer's statistics are found, by value, in the convolution before it
    diff = cli("diff", GOOD / "conv1d.safetensors", path, "--json")
    assert diff.exit_code == 0
    document = diff.json()
    assert document["only_in_a"] == [] and document["differs"] is False
    assert [(f["name_a"], f["feeder_a"], f["faithful"]) for f in document["folded"]] == [
        ("features.1", "features.0", True),
        ("features.4", "features.3", True),
    ]
    text = cli("diff", GOOD / "conv1d.safetensors", path).stdout
    assert "2 folded -> SAME" in " ".join(text.split())


def test_diff_tells_a_fold_of_other_statistics_from_a_faithful_one_and_from_a_dropped_layer(cli, tmp_path) -> None:
    digits, _ = make_fixtures.digits_data()
    model = conv_net()
    with torch.no_grad():
        model.features[1].running_mean += 0.5  # folded into the bias only
        model.features[4].running_var *= 4.0  # folded into the weight: nothing of B is A's fold any more
    path = tmp_path / "folded-other.onnx"
    make_fixtures.export_onnx(model, digits[:16].float(), path, dynamo=False)
    diff = cli("diff", GOOD / "conv1d.safetensors", path, "--json")
    assert diff.exit_code == 1
    document = diff.json()
    assert [(f["name_a"], f["faithful"], f["bias_b"]) for f in document["folded"]] == [("features.1", False, None)]
    assert document["only_in_a"] == ["features.4"]


def test_a_malformed_layer_is_not_folded_and_does_not_stop_the_diff(cli, tmp_path) -> None:
    path = tmp_path / "folded.onnx"
    digits, _ = make_fixtures.digits_data()
    make_fixtures.export_onnx(conv_net(), digits[:16].float(), path, dynamo=False)
    state = conv_net().state_dict()
    state["features.1.weight"] = state["features.1.weight"][:3]  # gamma of 3 channels beside statistics of 16
    source = tmp_path / "malformed.pt"
    torch.save(state, source)
    result = cli("diff", source, path, "--json")
    assert result.exit_code == 1
    document = result.json()
    assert [f["name_a"] for f in document["folded"]] == ["features.4"]
    assert document["only_in_a"] == ["features.1"]


def test_statistics_that_scale_by_one_are_not_claimed_as_folded(cli, tmp_path) -> None:
    # a fresh layer (mean 0, var 1, weight 1, bias 0) folds into its convolution unchanged within float32 rounding:
    # the file cannot say whether it was folded or dropped
    model = make_fixtures.ConvNet1d().float().eval()
    source = tmp_path / "fresh.pt"
    torch.save(model.state_dict(), source)
    path = tmp_path / "fresh.onnx"
    make_fixtures.export_onnx(model, torch.randn(4, 8, 16), path, dynamo=False)
    document = cli("diff", source, path, "--json").json()
    assert document["folded"] == [] and document["only_in_a"] == ["features.1", "features.4"]


def test_the_dynamo_exporter_writes_inference_nodes_for_a_model_in_train_mode(tmp_path: Path) -> None:
    # torch 2.13's dynamo exporter (onnxscript's torch_lib) sets training=False for every batch norm: a model left
    # in train mode exports as an eval graph, and the training= option is ignored
    model = make_fixtures.MLP().float()
    model.load_state_dict(torch.load(GOOD / "mlp-state-dict.pt", weights_only=True))
    path = tmp_path / "train-mode.onnx"
    make_fixtures.export_onnx(
        model.train(), torch.randn(8, 30), path, dynamo=True, optimize=False, training=torch.onnx.TrainingMode.TRAINING
    )
    report = inspect_file(path)
    assert [layer.configuration.training.value for layer in report.layers] == [False, False]
    assert report.findings == ()


def test_diff_finds_no_drift_in_faithful_exports(cli) -> None:
    exact = cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-onnx-eval.onnx", "--json")
    assert exact.exit_code == 0
    rows = exact.json()["layers"]
    assert [row["name_a"] for row in rows] == ["net.1", "net.4"]
    assert all(row["mean_shift_worst"] == 0 and row["log_var_ratio_worst"] == 0 for row in rows)
    assert cli("diff", GOOD / "conv1d.safetensors", GOOD / "conv1d-onnx-dynamo.onnx").exit_code == 0
    # float16 rounding moves the statistics, within what diff calls the same
    rounded = cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-onnx-fp16.onnx", "--json")
    assert rounded.exit_code == 0
    assert any(row["log_var_ratio_worst"] > 0 for row in rounded.json()["layers"])


def test_diff_reports_statistics_an_export_changed(cli, tmp_path: Path) -> None:
    changed = tmp_path / "changed.onnx"

    def shifted(values: np.ndarray) -> None:
        values += 1.0

    make_fixtures.edit_onnx_initializer(GOOD / "mlp-onnx-eval.onnx", changed, "net.4.running_mean", shifted)
    document = cli("diff", GOOD / "mlp-state-dict.pt", changed, "--json").json()
    assert [row["name_a"] for row in document["layers"] if row["drifted"]] == ["net.4"]


# ---------------------------------------------------------------- external data: only from inside the model's folder


def external_copy(folder: Path, location: str | None = None) -> Path:
    """The dynamo fixture and its .onnx.data copied into ``folder``, its tensors' location rewritten."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(GOOD / "conv1d-onnx-dynamo.onnx"), load_external_data=False)
    shutil.copy(GOOD / "conv1d-onnx-dynamo.onnx.data", folder / "conv1d-onnx-dynamo.onnx.data")
    if location is not None:
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def refusal(cli, path: Path) -> str:
    result = cli("inspect", path, "--json")
    assert result.exit_code == 2, result.stdout
    error = result.json()["files"][0]["error"]
    assert error["code"] == "corrupt" and "\n" not in error["message"]
    return str(error["message"])


def test_external_data_inside_the_folder_is_read(cli, tmp_path: Path) -> None:
    beside = external_copy(tmp_path / "beside")
    nested = external_copy(tmp_path / "nested", "weights/w.data")
    (nested.parent / "weights").mkdir()
    (nested.parent / "conv1d-onnx-dynamo.onnx.data").rename(nested.parent / "weights" / "w.data")
    linked = external_copy(tmp_path / "linked", "link.data")
    (linked.parent / "link.data").symlink_to(linked.parent / "conv1d-onnx-dynamo.onnx.data")
    expected = cli("inspect", GOOD / "conv1d-onnx-dynamo.onnx", "--json").json()["files"][0]["layers"]
    for path in (beside, nested, linked):
        result = cli("inspect", path, "--json")
        assert result.exit_code == 0, result.stdout
        assert result.json()["files"][0]["layers"] == expected


def test_external_data_outside_the_folder_is_refused(cli, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(GOOD / "conv1d-onnx-dynamo.onnx.data", outside / "secret.data")
    parent = external_copy(tmp_path / "model", "../elsewhere/secret.data")
    assert "outside the model's folder" in refusal(cli, parent)
    absolute = external_copy(tmp_path / "absolute", str(outside / "secret.data"))
    assert "outside the model's folder" in refusal(cli, absolute)
    windows = external_copy(tmp_path / "windows", "..\\elsewhere\\secret.data")
    assert "outside the model's folder" in refusal(cli, windows)
    linked = external_copy(tmp_path / "linked", "link.data")
    (linked.parent / "link.data").symlink_to(outside / "secret.data")
    assert "linked to" in refusal(cli, linked) and "outside the model's folder" in refusal(cli, linked)
    memory = external_copy(tmp_path / "memory", "*/_ORT_MEM_ADDR_/*")
    assert "no file name" in refusal(cli, memory)
    missing = external_copy(tmp_path / "missing", "gone.data")
    assert "missing" in refusal(cli, missing)
    too_long = external_copy(tmp_path / "long", "x" * 5000)
    assert "cannot be opened" in refusal(cli, too_long)
    looped = external_copy(tmp_path / "loop", "a.data")
    (looped.parent / "a.data").symlink_to(looped.parent / "b.data")
    (looped.parent / "b.data").symlink_to(looped.parent / "a.data")
    assert "cannot be resolved" in refusal(cli, looped)
    # onnx's own loader refuses the first two as well (the vulnerability class: GHSA-538c-55jv-c5g9 and others)
    for path in (parent, absolute):
        with pytest.raises(onnx.checker.ValidationError):
            onnx.load(str(path))


def test_external_data_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(GOOD / "conv1d-onnx-dynamo.onnx"), load_external_data=False)
    shutil.copy(GOOD / "conv1d-onnx-dynamo.onnx.data", tmp_path / "conv1d-onnx-dynamo.onnx.data")
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(10**12)
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(CorruptCheckpointError, match=r"needs .* bytes at offset 1000000000000"):
        open_checkpoint(tmp_path / "model.onnx")


def test_a_remote_model_reads_as_a_local_one_with_its_external_data(cli, tmp_path: Path) -> None:
    from range_server import RangeServer

    for path in ONNX_FIXTURES:
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(GOOD / "conv1d-onnx-dynamo.onnx.data", tmp_path / "conv1d-onnx-dynamo.onnx.data")
    escaping = external_copy(tmp_path / "escaping", "../conv1d-onnx-dynamo.onnx.data")
    with RangeServer(tmp_path) as server:
        for path in ONNX_FIXTURES:
            remote = cli("inspect", f"{server.url}/{path.name}", "--json").json()["files"][0]
            local = cli("inspect", tmp_path / path.name, "--json").json()["files"][0]
            for key in ("format", "size_bytes", "error", "layers", "findings"):
                assert remote[key] == local[key], (path.name, key)
        result = cli("inspect", f"{server.url}/escaping/{escaping.name}", "--json")
    assert result.exit_code == 2
    assert "outside the model's folder" in result.json()["files"][0]["error"]["message"]


# ---------------------------------------------------------------- what the name and first bytes say


def test_onnx_is_recognised_by_name_and_first_field(cli, tmp_path: Path) -> None:
    shutil.copy(GOOD / "mlp-onnx-eval.onnx", tmp_path / "model.bin")
    assert (
        "unknown format (first bytes 08 "
        in cli("inspect", tmp_path / "model.bin", "--json").json()["files"][0]["error"]["message"]
    )
    shutil.copy(GOOD / "mlp-state-dict.pt", tmp_path / "weights.onnx")
    file = cli("inspect", tmp_path / "weights.onnx", "--json").json()["files"][0]
    assert file["format"] == "torch zip"
    assert "named .onnx but its bytes are a torch.save file; read as what the bytes say" in file["notes"]
    (tmp_path / "notes.onnx").write_text("not a model\n")
    assert cli("inspect", tmp_path / "notes.onnx").exit_code == 2
    # a directory search picks .onnx files up, never their .onnx.data
    assert [p.name for p in find_checkpoints(GOOD) if "onnx" in p.name] == [
        "conv1d-onnx-dynamo.onnx",
        "mlp-onnx-eval.onnx",
        "mlp-onnx-fp16.onnx",
    ]


def test_inspecting_onnx_imports_neither_torch_nor_onnx() -> None:
    import subprocess

    probe = (
        "import sys\nfrom bncheck.cli import run\ncode = run(sys.argv[1:])\n"
        "print(code, 'torch' in sys.modules, 'onnx' in sys.modules)"
    )
    files = [str(p) for p in ONNX_FIXTURES]
    result = subprocess.run([sys.executable, "-c", probe, "inspect", *files], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "1 False False", result.stderr
