"""The HTML report: a picture per layer from the file's own values, non-finite values marked rather than dropped,
the channels findings name highlighted, links that resolve, nothing loaded from anywhere, and matplotlib kept to
this format. (tests/test_html_browser.py opens the pages in Chromium.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD, FIXTURES, GOOD, ROOT

import bncheck
from bncheck.config import Options
from bncheck.diff import diff_checkpoints
from bncheck.read import read_checkpoint
from bncheck.render.html import CSP, render_diff_html, render_html
from bncheck.render.json import render_diff_json, render_json
from bncheck.report import ChannelValues, FileReport, Finding, LayerInfo, Report, Severity, Summary

RECOMPUTE = FIXTURES / "recompute"


class Page(HTMLParser):
    """What a test needs of a page: every element's attributes, and each layer figure's SVG text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.figures: dict[str, list[str]] = {}  # figure id -> the texts of its SVG
        self.svgs_in: dict[str, int] = {}
        self._figure: str | None = None
        self._in_text = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "figure" and attributes.get("class") == "layer":
            self._figure = attributes["id"]
            self.figures[self._figure] = []
            self.svgs_in[self._figure] = 0
        elif tag == "svg" and self._figure is not None:
            self.svgs_in[self._figure] += 1
        self._in_text = tag == "text"

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None
        self._in_text = False

    def handle_data(self, data: str) -> None:
        if self._in_text and self._figure is not None:
            self.figures[self._figure].append(data)

    def ids(self) -> list[str]:
        return [attrs["id"] for _, attrs in self.elements if attrs.get("id")]

    def legend(self, figure: str) -> set[str]:
        """The texts of a figure that name something (legend entries), not numbers on its axes."""
        return {text for text in self.figures[figure] if not re.fullmatch(r"[-\d.e+]+", text)}


def inspected(*paths: Path, **options: object) -> Report:
    return bncheck.inspect(list(paths), options=Options(channel_values=True, **options))  # type: ignore[arg-type]


def values(data: list[float]) -> ChannelValues:
    return ChannelValues(np.asarray(data, dtype=np.float64).tobytes())


def one_layer_report(mean: list[float], var: list[float], findings: tuple[Finding, ...] = ()) -> Report:
    summary = Summary(min=0.0, max=1.0, mean=0.5)
    layer = LayerInfo(
        name="bn",
        source="",
        averaged=False,
        kind="BatchNorm1d",
        kind_inferred=False,
        num_features=len(mean),
        dtype="float32",
        num_batches_tracked=10,
        running_mean=summary,
        running_var=summary,
        mean_by_channel=values(mean),
        var_by_channel=values(var),
    )
    return Report(
        files=(FileReport(path="m.pt", format="torch zip", size_bytes=1, layers=(layer,), findings=findings),)
    )


# ------------------------------------------------------------------------------------------------- the data


def test_channel_values_are_the_files_values_and_kept_only_when_asked() -> None:
    path = BAD / "BN001-diverged-nan.pt"
    _, layers = read_checkpoint(path)
    kept = inspected(path).files[0]
    for layer, data in zip(kept.layers, layers, strict=True):
        assert layer.mean_by_channel is not None and layer.var_by_channel is not None
        np.testing.assert_array_equal(np.array(layer.mean_by_channel.tolist()), data.floats("running_mean"))
        np.testing.assert_array_equal(np.array(layer.var_by_channel.tolist()), data.floats("running_var"))
    assert np.isnan(kept.layers[0].mean_by_channel.tolist()).sum() == 25  # NaN kept as NaN
    plain = bncheck.inspect(path).files[0]
    assert all(layer.mean_by_channel is None and layer.var_by_channel is None for layer in plain.layers)


def test_json_is_the_same_document_with_or_without_channel_values() -> None:
    paths = [BAD / "BN001-diverged-nan.pt", GOOD / "mlp-state-dict.pt"]
    assert render_json(inspected(*paths)) == render_json(bncheck.inspect(paths))
    a, b = GOOD / "mlp-state-dict.pt", BAD / "BN002-negative-var.safetensors"
    kept = diff_checkpoints(a, b, channel_values=True)
    assert render_diff_json(kept) == render_diff_json(diff_checkpoints(a, b))


def test_diff_keeps_channel_values_of_drifted_layers_only() -> None:
    a, b = GOOD / "mlp-state-dict.pt", BAD / "BN002-negative-var.safetensors"
    diff = diff_checkpoints(a, b, channel_values=True)
    assert [row.drifted for row in diff.layers] == [True, True]
    _, layers_b = read_checkpoint(b)
    row = diff.layers[0]
    assert row.var_b is not None and row.mean_a is not None
    np.testing.assert_array_equal(np.array(row.var_b.tolist()), layers_b[0].floats("running_var"))
    same = diff_checkpoints(GOOD / "mlp-state-dict.pt", GOOD / "mlp-ema-timm-style.pth", channel_values=True)
    assert same.layers and all(r.mean_a is None and r.var_b is None for r in same.layers)


# ------------------------------------------------------------------------------------------------ the pictures


@pytest.mark.parametrize("paths", [[BAD], [GOOD / "mlp-state-dict.pt", BAD / "BN006-missing-var.pt"]])
def test_one_picture_per_layer_with_its_own_svg(paths: list[Path]) -> None:
    report = inspected(*paths)
    page = Page(render_html(report))
    layers = sum(len(file.layers) for file in report.files)
    assert layers > 2 and len(page.figures) == layers
    assert set(page.svgs_in.values()) == {1}


def test_non_finite_values_are_marked_with_their_counts() -> None:
    nan, inf = float("nan"), float("inf")
    report = one_layer_report(mean=[0.1, nan, inf, -inf, 0.3, 0.2], var=[1.0, nan, inf, -inf, -2.0, 0.0])
    page = Page(render_html(report))
    legend = page.legend("f1-layer-1")
    # each panel: one NaN, one +inf, one -inf; on the log scale also the two variances <= 0 (-2 and 0)
    marks = {label for label in legend if " in " in label}
    assert marks == {f"{kind} in {panel} (1)" for kind in ("NaN", "+inf", "-inf") for panel in ("mean", "var")} | {
        "≤ 0 in var (2)"
    }


def test_values_between_gaps_get_dots_where_a_line_would_not_show() -> None:
    """1024 channels, every other one NaN: no two drawn values are adjacent, so each of the 512 gets a dot."""
    mean = [float("nan") if c % 2 else 0.1 * (c % 7) for c in range(1024)]
    text = render_html(one_layer_report(mean=mean, var=[1.0] * 1024))
    svg = text[text.index("<svg") : text.index("</svg>")]
    assert svg.count("<use ") >= 512
    whole = render_html(one_layer_report(mean=[0.1 * (c % 7) for c in range(1024)], var=[1.0] * 1024))
    assert whole[whole.index("<svg") : whole.index("</svg>")].count("<use ") < 100  # a plain line: ticks only


def test_a_finite_layer_has_no_marks_and_no_legend() -> None:
    page = Page(render_html(one_layer_report(mean=[0.1, 0.2, 0.3], var=[1.0, 2.0, 3.0])))
    assert page.legend("f1-layer-1") == {"running_mean", "running_var (log scale)"}


def test_the_channels_a_finding_names_are_highlighted_on_their_tensor(tmp_path) -> None:
    report = inspected(BAD / "BN008-constant-feature.pt", BAD / "BN002-negative-var.safetensors")
    page = Page(render_html(report))
    bn008 = next(f for f in report.files[0].findings if f.code == "BN008")
    assert bn008.tensor == "running_var" and bn008.channels == (30,)
    assert "named by BN008" in page.legend("f1-layer-1")
    assert "named by BN008" not in " ".join(page.legend("f1-layer-2"))
    assert {"named by BN002", "≤ 0 in var (29)"} <= page.legend("f2-layer-1")


def test_recomputation_draws_the_recomputed_values_and_the_drift_across_the_model() -> None:
    from bncheck.recompute import RecomputeRequest

    request = RecomputeRequest(
        model=f"{RECOMPUTE / 'models.py'}:tabular_mlp", data=str(RECOMPUTE / "sample-shifted.npy")
    )
    path = RECOMPUTE / "stale-untracked-finetune.safetensors"
    report = bncheck.inspect(path, options=Options(channel_values=True), recompute=request)
    (file,) = report.files
    assert file.recompute is not None
    for row in file.recompute.layers:
        assert row.recomputed_mean is not None and len(row.recomputed_mean) == 64
    text = render_html(report)
    page = Page(text)
    assert len(page.figures) == 2 and all("recomputed" in page.legend(f) for f in page.figures)
    drift = text[text.index('<figure class="drift">') : text.index("</figure>", text.index('<figure class="drift">'))]
    assert "mean shift (std)" in drift and "stale" in drift and "worst channel" in drift


def test_diff_page_draws_the_drift_and_each_drifted_layer() -> None:
    diff = diff_checkpoints(GOOD / "mlp-state-dict.pt", BAD / "BN002-negative-var.safetensors", channel_values=True)
    text = render_diff_html(diff)
    page = Page(text)
    assert sorted(page.figures) == ["d-layer-1", "d-layer-2"]
    assert {"A", "B", "B: ≤ 0 in var (29)"} <= page.legend("d-layer-1")
    assert '<figure class="drift">' in text and "beyond the thresholds" in text
    same = render_diff_html(diff_checkpoints(GOOD / "mlp-state-dict.pt", GOOD / "mlp-ema-timm-style.pth"))
    assert not Page(same).figures and "SAME" in same


def test_a_big_layer_stays_small() -> None:
    """1024 noisy channels: the SVG keeps the vertices a screen can show, at a tenth of a point."""
    rng = np.random.default_rng(0)
    report = one_layer_report(mean=list(rng.normal(size=1024) * 0.1), var=list(rng.random(1024) + 0.5))
    text = render_html(report)
    svg = text[text.index("<svg") : text.index("</svg>")]
    assert len(svg) < 25_000
    paths = re.findall(r' d="([^"]*)"', svg)
    assert len(paths) > 10 and not any(re.search(r"\.\d\d", d) for d in paths)  # a tenth of a point


# ---------------------------------------------------------------------------------------------- the page itself


def test_the_page_loads_nothing_and_every_link_resolves() -> None:
    report = inspected(BAD, GOOD / "mlp-state-dict.pt")
    text = render_html(report)
    page = Page(text)
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    assert "://" not in text  # no URL of any kind, not even an SVG namespace
    assert not any(tag in ("script", "link", "img", "iframe", "object", "embed") for tag, _ in page.elements)
    assert "@import" not in text and "@font-face" not in text
    assert all(target.startswith("#") for target in re.findall(r"url\(([^)]*)\)", text))  # clip paths, in the page
    ids = page.ids()
    assert len(ids) == len(set(ids)), "duplicate ids"
    links = [attrs.get("href") or attrs.get("xlink:href") for _, attrs in page.elements]
    links = [link for link in links if link is not None]
    assert links and all(link.startswith("#") and link[1:] in set(ids) for link in links)


def test_the_same_report_gives_the_same_bytes() -> None:
    report = inspected(BAD / "BN001-fp16-overflow.safetensors")
    assert render_html(report) == render_html(report)


def test_names_from_the_file_are_escaped() -> None:
    hostile = "<script>alert(1)</script>\x1b[2J\u202e"
    report = one_layer_report(mean=[0.0, 1.0], var=[1.0, 2.0])
    file = report.files[0]
    layer = file.layers[0].__class__(**{**file.layers[0].__dict__, "name": hostile})
    finding = Finding(code="BN008", severity=Severity.WARNING, message=hostile, hint="h", layer=hostile, source="")
    poisoned = Report(files=(FileReport(path=hostile, format="x", size_bytes=1, layers=(layer,), findings=(finding,)),))
    text = render_html(poisoned)
    assert "<script" not in text and "\x1b" not in text and "\u202e" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J\\u202e" in text
    assert 'href="#f1-layer-1"' in text  # the finding still links to its layer


def test_rendering_leaves_matplotlib_as_it_found_it() -> None:
    probe = (
        "import sys, matplotlib\n"
        "from bncheck.render.html import render_html\n"
        "from test_html import one_layer_report\n"
        "before = matplotlib.rcParams.copy()\n"  # copy() reads without resolving the backend (which loads pyplot)
        "render_html(one_layer_report(mean=[0.0, 1.0], var=[1.0, 2.0]))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams.copy() == before, 'settings changed'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------- matplotlib stays optional

IMPORTS = """
import sys
from bncheck.cli import run
code = run(sys.argv[1:])
print("exit", code, "matplotlib" in sys.modules)
"""

WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if it were not installed
from bncheck.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "github"])
def test_other_formats_never_import_matplotlib(fmt: str) -> None:
    args = ["inspect", str(GOOD / "mlp-state-dict.pt"), "--format", fmt]
    result = subprocess.run([sys.executable, "-c", IMPORTS, *args], capture_output=True, text=True, check=False)
    assert result.stdout.strip().splitlines()[-1] == "exit 0 False", result.stderr
    html = subprocess.run(
        [sys.executable, "-c", IMPORTS, *args[:2], "--format", "html"], capture_output=True, text=True, check=False
    )
    assert html.stdout.strip().splitlines()[-1] == "exit 0 True"  # the probe can see an import


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", str(GOOD / "mlp-state-dict.pt"), "--format", "html"],
        ["diff", str(GOOD / "mlp-state-dict.pt"), str(GOOD / "conv1d.safetensors"), "--format", "html"],
    ],
)
def test_without_matplotlib_html_is_a_one_line_error(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "bncheck: error: the HTML report draws with matplotlib: pip install 'bncheck[html]'\n"


def test_cli_writes_the_page_and_keeps_the_exit_code(cli) -> None:
    result = cli("inspect", BAD / "BN002-negative-var.safetensors", "--format", "html")
    assert result.exit_code == 1 and result.stdout.startswith("<!DOCTYPE html>")
    assert len(Page(result.stdout).figures) == 2
    missing = cli("inspect", GOOD / "mlp-state-dict.pt", "gone.pt", "--format", "html")
    assert missing.exit_code == 2 and "NOT CHECKED" in missing.stdout
    assert missing.stderr == "bncheck: gone.pt: no such file or directory\n"  # said where a person sees it
