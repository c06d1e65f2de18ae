"""bncheck diff: layer-by-layer drift between two checkpoints, across formats, prefixes and entries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import FIXTURES, GOOD


def test_diff_finds_the_layers_a_finetune_moved(cli, tmp_path: Path) -> None:
    sys.path.insert(0, str(FIXTURES / "recompute"))
    import numpy as np
    from models import tabular_mlp

    base = tabular_mlp()
    base.load_state_dict(torch.load(FIXTURES / "recompute" / "healthy.pt", weights_only=True))
    x = torch.from_numpy(np.load(FIXTURES / "recompute" / "sample-shifted.npy"))
    y = torch.from_numpy(np.load(FIXTURES / "recompute" / "labels.npy"))
    optimizer = torch.optim.Adam(base.parameters(), lr=3e-3)
    base.train()
    for step in range(100):  # an ordinary fine-tune on shifted data: the statistics follow the data
        batch = slice((step * 64) % 960, (step * 64) % 960 + 64)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(base(x[batch]), y[batch]).backward()
        optimizer.step()
    tuned = tmp_path / "tuned.pt"
    torch.save({"model": base.state_dict()}, tuned)
    result = cli("diff", FIXTURES / "recompute" / "healthy.pt", tuned, "--json")
    document = json.loads(result.stdout)
    assert result.exit_code == 1
    assert [row["name_a"] for row in document["layers"] if row["drifted"]] == ["1"]
    assert document["b"]["source"] == "model"


def test_diff_across_formats_and_prefixes_finds_nothing(cli, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    converted = tmp_path / "converted.safetensors"
    save_file(torch.load(GOOD / "mlp-state-dict.pt", weights_only=True), converted)
    result = cli("diff", GOOD / "mlp-state-dict.pt", converted, "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["differs"] is False and len(document["layers"]) == 2
    assert all(row["mean_shift_worst"] == 0 and row["log_var_ratio_worst"] == 0 for row in document["layers"])
    # module.-prefixed DataParallel save and an fp16 export of the same model
    assert cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-dataparallel.pt").exit_code == 0
    assert cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-fp16.pt").exit_code == 0


def test_diff_ema_against_raw_weights_in_one_file(cli) -> None:
    result = cli(
        "diff",
        GOOD / "mlp-ema-timm-style.pth",
        GOOD / "mlp-ema-timm-style.pth",
        "--source-b",
        "state_dict_ema",
        "--json",
    )
    document = json.loads(result.stdout)
    assert (document["a"]["source"], document["b"]["source"]) == ("state_dict", "state_dict_ema")
    assert len(document["layers"]) == 2


def test_diff_reports_one_sided_and_resized_layers(cli, tmp_path: Path) -> None:
    state = torch.load(GOOD / "mlp-state-dict.pt", weights_only=True)
    narrower = dict(state)
    for key in ("weight", "bias", "running_mean", "running_var"):
        narrower[f"net.4.{key}"] = state[f"net.4.{key}"][:8]
    narrower["extra.running_mean"], narrower["extra.running_var"] = torch.zeros(3), torch.ones(3)
    path = tmp_path / "changed.pt"
    torch.save(narrower, path)
    document = json.loads(cli("diff", GOOD / "mlp-state-dict.pt", path, "--json").stdout)
    assert document["only_in_b"] == ["extra"]
    assert document["channel_changes"] == [{"layer": "net.4", "a": 16, "b": 8}]


def test_diff_of_an_unreadable_file_exits_2(cli, tmp_path: Path) -> None:
    result = cli("diff", GOOD / "mlp-state-dict.pt", tmp_path / "none.pt")
    assert result.exit_code == 2


def test_the_search_for_folded_layers_stops_within_twice_the_files_size(cli, tmp_path: Path) -> None:
    # B: 2,000 tensor records viewing one 1 MiB storage (torch.save keeps shared storage once): each is a candidate
    # for the fold of A's layer, and reading them all would cost 2 GiB for a 1 MiB file
    base = torch.rand(4 * 65536)
    torch.save({f"view{i}": base.view(4, 65536) for i in range(2000)}, tmp_path / "views.pt")
    state = {
        "fc.weight": torch.randn(4, 65536),
        "bn.weight": torch.rand(4) + 0.5,
        "bn.bias": torch.randn(4),
        "bn.running_mean": torch.randn(4),
        "bn.running_var": torch.rand(4) + 0.5,
    }
    torch.save(state, tmp_path / "source.pt")
    document = cli("diff", tmp_path / "source.pt", tmp_path / "views.pt", "--json").json()
    assert document["folded"] == [] and document["only_in_a"] == ["bn"]
    assert len(document["notes"]) == 1 and document["notes"][0].startswith("the search for folded layers stopped")
