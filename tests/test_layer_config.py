"""Each layer's configuration, read from pickled modules, TorchScript code and config.json without running any of
it; hostile or odd sources are notes or nothing, never a traceback; and what a Keras momentum costs, measured."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAD, FIXTURES, GOOD
from torch import nn

from bncheck.api import inspect_file
from bncheck.checks import RULES, Thresholds
from bncheck.layer_config import (
    EXPORTED_PROGRAM,
    ONNX_NODE,
    PICKLED,
    SCRIPT_CONSTANT,
    TRACED,
    ScriptCode,
    layer_config,
    model_configs,
)
from bncheck.read import read_checkpoint
from bncheck.report import LayerConfig, Setting, Severity

FIELDS = ("momentum", "eps", "training", "track_running_stats", "affine")


def configs(path: Path) -> list[LayerConfig]:
    return [data.config for data in read_checkpoint(path)[1]]


def codes(path: Path) -> set[tuple[str, str]]:
    return {(f.code, f.severity.value) for f in inspect_file(path).findings}


def test_a_pickled_module_gives_every_setting() -> None:
    (first, second) = configs(BAD / "BN014-keras-momentum-full-module.pt")
    assert first == second
    assert first.momentum == Setting(value=0.99, source=PICKLED)
    assert first.eps == Setting(value=1e-5, source=PICKLED)
    assert (first.training, first.track_running_stats, first.affine) == (
        Setting(value=False, source=PICKLED),
        Setting(value=True, source=PICKLED),
        Setting(value=True, source=PICKLED),
    )


def test_a_scripted_archive_gives_its_constants_and_its_training_attribute() -> None:
    for config in configs(BAD / "BN014-keras-momentum-torchscript.pt"):
        assert config.momentum == Setting(value=0.99, source=SCRIPT_CONSTANT)
        assert config.training == Setting(value=False, source="TorchScript attribute")
        assert config.track_running_stats == Setting(value=True, source=SCRIPT_CONSTANT)


def test_a_traced_archive_gives_what_its_batch_norm_calls_baked_in() -> None:
    for config in configs(BAD / "BN016-traced-in-train-mode.pt"):
        assert config.training == Setting(value=True, source=TRACED)
        assert config.momentum == Setting(value=0.1, source=TRACED)
        assert config.eps == Setting(value=1e-5, source=TRACED)
    assert codes(BAD / "BN016-traced-in-train-mode.pt") == {("BN016", "error")}


def test_each_fixture_gets_its_rule_with_its_severity() -> None:
    assert codes(BAD / "BN014-keras-momentum-torchscript.pt") == {("BN014", "warning")}
    assert codes(BAD / "BN015-eps-passed-by-position.pt") == {("BN015", "warning"), ("BN102", "warning")}
    assert codes(BAD / "BN016-saved-in-train-mode.pt") == {("BN016", "warning"), ("BN102", "warning")}
    assert ("BN017", "warning") in codes(BAD / "BN017-tracking-off-for-inference.pt")


def test_a_state_dict_records_no_configuration_and_gets_no_bn014() -> None:
    path = FIXTURES / "recompute" / "keras-momentum-state-dict.pt"
    assert all(not config.known for config in configs(path))
    assert inspect_file(path).findings == ()


def test_config_json_beside_hugging_face_weights_is_model_wide() -> None:
    file = inspect_file(BAD / "BN014-hf-efficientnet" / "model.safetensors")
    (config,) = file.model_configs
    assert (config.file, config.path, config.model_type) == ("config.json", "", "efficientnet")
    assert config.settings.momentum == Setting(value=0.99, source="config.json batch_norm_momentum")
    assert config.settings.eps == Setting(value=0.001, source="config.json batch_norm_eps")
    (finding,) = file.findings
    assert (finding.code, finding.layer) == ("BN014", None)  # the file's, not a layer's
    assert all(not layer.configuration.known for layer in file.layers)


def test_every_good_fixture_records_a_healthy_configuration_or_none() -> None:
    scripted = configs(GOOD / "conv1d-torchscript.pt")
    assert [c.training for c in scripted] == [Setting(value=False, source="TorchScript attribute")] * 2


def write_hf(folder: Path, config: bytes | str, weights: str = "model.safetensors") -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    import numpy as np

    tensors = {
        "bn.running_mean": np.full(4, 0.5, np.float32),
        "bn.running_var": np.full(4, 2.0, np.float32),
        "bn.num_batches_tracked": np.array(100, np.int64),
    }
    save_file(tensors, folder / weights)
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    return folder / weights


@pytest.mark.parametrize(
    ("text", "note"),
    [
        (b"{not json", "could not be read"),
        (b"\xff\xfe\x00garbage", "could not be read"),
        (b"[1, 2, 3]", "is not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "could not be read"),
        (b'{"batch_norm_momentum": ' + b"9" * 5000 + b"}", "could not be read"),
        (b" " * (2 << 20), "larger than"),
    ],
)
def test_a_config_json_that_cannot_be_read_is_a_note(tmp_path: Path, text: bytes, note: str) -> None:
    file = inspect_file(write_hf(tmp_path / "m", text))
    assert file.error is None and file.model_configs == () and file.findings == ()
    assert any(note in n and "config.json" in n for n in file.notes), file.notes


def test_config_json_values_of_the_wrong_kind_are_not_settings(tmp_path: Path) -> None:
    document = {
        "model_type": "x",
        "batch_norm_momentum": "0.99",
        "batch_norm_eps": True,
        "layer_norm_eps": 0.9,  # LayerNorm's: not a BatchNorm setting
        "vision_config": {"model_type": "y", "bn_momentum": 0.997, "bn_eps": None},
    }
    file = inspect_file(write_hf(tmp_path / "m", json.dumps(document)))
    (config,) = file.model_configs
    assert (config.path, config.model_type) == ("vision_config", "y")
    assert config.settings == LayerConfig(momentum=Setting(value=0.997, source="config.json vision_config.bn_momentum"))
    assert [(f.code, f.message.split(":")[0]) for f in file.findings] == [
        ("BN014", "momentum 0.997 (config.json vision_config.bn_momentum)")
    ]


def test_config_json_is_read_only_beside_hugging_face_weight_names(tmp_path: Path) -> None:
    path = write_hf(tmp_path / "m", '{"batch_norm_momentum": 0.99}', weights="checkpoint.safetensors")
    assert inspect_file(path).model_configs == ()
    shard = write_hf(tmp_path / "s", '{"batch_norm_momentum": 0.99}', weights="model-00001-of-00002.safetensors")
    assert model_configs(shard)[0][0].settings.momentum == Setting(value=0.99, source="config.json batch_norm_momentum")


def test_odd_torchscript_code_gives_no_settings_and_no_error() -> None:
    code = ScriptCode(
        [
            ("__torch__/a.py", "no class here\n" * 10),
            (
                "__torch__/b.py",
                "class X(Module):\n  momentum : Final[float] = nonsense\n  eps : Final[float] = 1e999\n",
            ),
            (
                "c.py",
                "class Y(Module):\n  def forward(self):\n    torch.batch_norm(a, b)\n"
                "    torch.batch_norm(a, w, b, m, v, True, 0.1, 1e-05, True)\n",
            ),
            ("__torch__/d.py", "class Z(Module):\n    x = torch.batch_norm(a, w, b, m, v, maybe, (0.1), eps, True)\n"),
            (
                "__torch__/e.py",
                "class W(Module):\n" + "  momentum : Final[float] = 0.5\n" * 3 + "torch.batch_norm(" * 1000,
            ),
        ]
    )
    from bncheck.discover import BNLayer
    from bncheck.loaders.restricted_pickle import placeholder_class

    def config_of(name: str, state: object = None) -> LayerConfig:
        node = placeholder_class(name)()
        node.__setstate__(state if state is not None else {})
        return layer_config(BNLayer("bn", "", False, "BatchNorm1d", False, {}, True, module=node), code)

    assert config_of("__torch__.a.X") == LayerConfig()
    b = config_of("__torch__.b.X")
    assert b.momentum is None and b.eps is not None and math.isinf(float(b.eps.value))  # a literal, read as one
    assert config_of("__torch__.c.Y") == LayerConfig()  # two calls: which is the layer's is unknown
    assert config_of("__torch__.d.Z") == LayerConfig()  # arguments that are not literals
    assert config_of("__torch__.e.W").momentum == Setting(value=0.5, source=SCRIPT_CONSTANT)
    # a pickled module's state of the wrong kinds: nothing but real numbers and bools are settings
    hostile = {"momentum": "0.99", "eps": [1], "training": 1, "track_running_stats": None, "affine": object()}
    assert config_of("m.BatchNorm1d", hostile) == LayerConfig()
    huge = config_of("m.BatchNorm1d", {"momentum": 10**400, "eps": -(10**400)})
    assert huge.momentum == Setting(value=math.inf, source=PICKLED)
    assert huge.eps == Setting(value=-math.inf, source=PICKLED)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"momentum": 0.1}, []),
        ({"momentum": None}, []),  # a cumulative average
        ({"momentum": 0.5}, [("BN014", Severity.WARNING)]),
        ({"momentum": 0.99}, [("BN014", Severity.WARNING)]),
        ({"momentum": 1.0}, [("BN014", Severity.WARNING)]),
        ({"momentum": 0.0}, [("BN014", Severity.ERROR)]),
        ({"momentum": -0.1}, [("BN014", Severity.ERROR)]),
        ({"momentum": 1.5}, [("BN014", Severity.ERROR)]),
        ({"momentum": math.nan}, [("BN014", Severity.ERROR)]),
        ({"eps": 1e-5}, []),
        ({"eps": 1e-3}, []),  # TensorFlow ports
        ({"eps": 0.9}, [("BN015", Severity.WARNING)]),
        ({"eps": 0.0}, [("BN015", Severity.ERROR)]),
        ({"eps": -1e-5}, [("BN015", Severity.ERROR)]),
        ({"eps": math.nan}, [("BN015", Severity.ERROR)]),
        ({"training": False}, []),
        ({"training": True}, [("BN016", Severity.WARNING)]),
        ({"track_running_stats": True}, []),
        ({"track_running_stats": False}, [("BN017", Severity.WARNING)]),
    ],
)
def test_rule_severities(settings: dict, expected: list) -> None:
    from bncheck.checks import run_checks
    from bncheck.report import ModelConfig

    config = LayerConfig(**{k: Setting(value=v, source="pickled module") for k, v in settings.items()})
    found = run_checks([], model_configs=[ModelConfig(file="f", path="", model_type=None, settings=config)])
    assert [(f.code, f.severity) for f in found] == expected
    traced = LayerConfig(training=Setting(value=True, source=TRACED))
    assert [hit.severity for hit in RULES["BN016"].check(traced, Thresholds())] == [Severity.ERROR]


@pytest.mark.parametrize("source", [EXPORTED_PROGRAM, ONNX_NODE, f"{ONNX_NODE} (is_test=0)"])
def test_exported_training_mode_is_bn019_not_bn016(source: str) -> None:
    exported = LayerConfig(training=Setting(value=True, source=source))
    assert RULES["BN019"].severity == Severity.ERROR
    assert [hit.message.split(" (")[0] for hit in RULES["BN019"].check(exported, Thresholds())] == [
        "training=True in the exported graph"
    ]
    assert not list(RULES["BN016"].check(exported, Thresholds()))
    inference = LayerConfig(training=Setting(value=False, source=source))
    assert not list(RULES["BN019"].check(inference, Thresholds()))
    pickled = LayerConfig(training=Setting(value=True, source="pickled module"))
    assert not list(RULES["BN019"].check(pickled, Thresholds()))


def test_thresholds_move_bn014_and_bn015() -> None:
    config = LayerConfig(momentum=Setting(value=0.3, source="x"), eps=Setting(value=0.005, source="x"))
    strict = Thresholds(max_momentum=0.25, max_eps=0.001)
    assert [h.message.split(" ")[0] for h in RULES["BN014"].check(config, strict)] == ["momentum"]
    assert [h.message.split(" ")[0] for h in RULES["BN015"].check(config, strict)] == ["eps"]
    assert not list(RULES["BN014"].check(config, Thresholds())) and not list(RULES["BN015"].check(config, Thresholds()))


# ---------------------------------------------------------------- what momentum 0.99 costs (README, "Mistakes")


@pytest.fixture
def make_fixtures():
    sys.path.insert(0, str(FIXTURES))
    import make_fixtures

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as make_all builds the fixture models
    yield make_fixtures
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def held_out_accuracy(make_fixtures, model: nn.Module) -> float:
    _, _, x_test, y_test = make_fixtures.cancer_split()
    model.eval()
    with torch.no_grad():
        return float((model(x_test.float()).argmax(1) == y_test).double().mean())


def test_momentum_099_costs_eval_accuracy_on_the_fixture_model(make_fixtures) -> None:
    shipped = make_fixtures.MLP()
    shipped.load_state_dict(torch.load(FIXTURES / "recompute" / "keras-momentum-state-dict.pt", weights_only=True))
    shipped.float()
    keras = held_out_accuracy(make_fixtures, shipped)
    pytorch = held_out_accuracy(make_fixtures, make_fixtures.momentum_mlp(0.1).float())
    # recalibrated: the same weights with statistics averaged over the whole training split
    x_train = make_fixtures.cancer_split()[0].float()
    for layer in shipped.modules():
        if isinstance(layer, nn.BatchNorm1d):
            layer.reset_running_stats()
            layer.momentum = None
    shipped.train()
    with torch.no_grad():
        shipped(x_train)
    recalibrated = held_out_accuracy(make_fixtures, shipped)
    assert (round(keras, 3), round(pytorch, 3), round(recalibrated, 3)) == (0.971, 0.977, 0.977)


def test_momentum_099_makes_eval_accuracy_a_lottery_of_the_last_batch(make_fixtures) -> None:
    mf = make_fixtures
    x_train, y_train, _, _ = mf.cancer_split()
    accuracy = {}
    for momentum in (0.1, 0.99):
        runs = []
        for seed in range(5):
            torch.manual_seed(seed)
            model = mf.MLP(norm=functools.partial(nn.BatchNorm1d, momentum=momentum))
            mf.train(model, x_train, y_train, steps=200, batch_size=32, seed=seed)
            runs.append(round(held_out_accuracy(mf, model), 3))
        accuracy[momentum] = runs
    assert accuracy == {0.1: [0.965, 0.959, 0.965, 0.959, 0.971], 0.99: [0.953, 0.971, 0.895, 0.959, 0.924]}


def test_non_finite_settings_are_json_strings_that_follow_the_schema(cli, tmp_path: Path) -> None:
    import jsonschema
    from conftest import ROOT

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model(torch.randn(8, 3))
    model[1].momentum, model[1].eps = math.nan, math.inf
    torch.save(model.eval(), tmp_path / "odd.pt")
    document = cli("inspect", tmp_path / "odd.pt", "--json").json()
    schema = json.loads((ROOT / "bncheck" / "schema" / "report-v1.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(document)
    configuration = document["files"][0]["layers"][0]["configuration"]
    assert configuration["momentum"] == {"value": "nan", "source": "pickled module"}
    assert configuration["eps"] == {"value": "inf", "source": "pickled module"}
    assert configuration["training"] == {"value": False, "source": "pickled module"}
    assert {(f["code"], f["severity"]) for f in document["files"][0]["findings"]} >= {
        ("BN014", "error"),
        ("BN015", "warning"),
    }


def test_the_text_report_says_each_configuration_and_its_source(cli) -> None:
    text = " ".join(cli("inspect", BAD / "BN017-tracking-off-for-inference.pt").stdout.split())
    assert "configuration: momentum 0.1 · eps 1e-05 · train mode · tracking off (pickled module) in 2 layers" in text
    assert "BN017 warning 2 layers: net.1, net.4 track_running_stats is False (pickled module)" in text
    hf = " ".join(cli("inspect", BAD / "BN014-hf-efficientnet").stdout.split())
    assert "config.json (model_type efficientnet), for the model as a whole: batch_norm_momentum 0.99" in hf
    assert "BN014 warning momentum 0.99 (config.json batch_norm_momentum)" in hf


def test_a_state_dict_takes_the_configuration_of_the_model_it_is_loaded_into(cli, make_fixtures, tmp_path) -> None:
    import numpy as np

    factory = tmp_path / "factory.py"
    factory.write_text(
        "import functools, sys\n"
        "from torch import nn\n"
        f"sys.path.insert(0, {str(FIXTURES)!r})\n"
        "from make_fixtures import MLP\n"
        "def keras_mlp():\n"
        "    return MLP(norm=functools.partial(nn.BatchNorm1d, momentum=0.99))\n"
    )
    np.save(tmp_path / "x.npy", make_fixtures.cancer_split()[2].float().numpy())
    path = FIXTURES / "recompute" / "keras-momentum-state-dict.pt"
    args = ("--model", f"{factory}:keras_mlp", "--data", tmp_path / "x.npy", "--json")
    (file,) = cli("inspect", path, *args).json()["files"]
    assert file["recompute_error"] is None
    for layer in file["layers"]:
        assert layer["configuration"]["momentum"] == {"value": 0.99, "source": "--model"}
        assert layer["configuration"]["training"] is None  # the mode recomputation chose says nothing
    assert [(f["code"], f["layer"]) for f in file["findings"]] == [("BN014", "net.1"), ("BN014", "net.4")]
    # without --model the same file records nothing
    assert cli("inspect", path, "--json").json()["files"][0]["findings"] == []


def test_exported_calls_give_each_layer_its_configuration() -> None:
    from bncheck.discover import find_bn_layers
    from bncheck.loaders.interface import Checkpoint, RecordedCall, in_memory
    from bncheck.read import read_layers

    stats = {"running_mean": in_memory(np.zeros(4, np.float32), "float32")}
    stats["running_var"] = in_memory(np.ones(4, np.float32), "float32")
    root = {f"{name}.{key}": ref for name in ("bn1", "bn2", "bn3") for key, ref in stats.items()}
    calls = (
        RecordedCall("bn1", EXPORTED_PROGRAM, (("training", False), ("momentum", 0.1), ("eps", 1e-5))),
        RecordedCall("bn2", EXPORTED_PROGRAM, (("training", False), ("momentum", 0.1), ("eps", 1e-5))),
        # a layer called twice: training in any call is what its graph does at inference
        RecordedCall("bn2", EXPORTED_PROGRAM, (("training", True), ("momentum", 0.5), ("eps", "not a number"))),
    )
    checkpoint = Checkpoint(format="test", root=root, calls=calls)
    configs = {data.layer.name: data.config for data in read_layers(find_bn_layers(root), checkpoint)}
    assert configs["bn1"] == LayerConfig(
        training=Setting(value=False, source=EXPORTED_PROGRAM),
        momentum=Setting(value=0.1, source=EXPORTED_PROGRAM),
        eps=Setting(value=1e-5, source=EXPORTED_PROGRAM),
    )
    assert configs["bn2"].training == Setting(value=True, source=EXPORTED_PROGRAM)
    assert configs["bn2"].momentum == Setting(value=0.1, source=EXPORTED_PROGRAM)
    assert configs["bn3"] == LayerConfig()
