"""The rules: small pure functions over one layer's arrays or configuration (or one model's layers, or one file's
pickle globals).

Each rule is registered under a stable code that is never reused. Its docstring (What / Why / Fix) is the long help
text; ``summary`` is the one-line description and ``hint`` the likely cause and fix printed under a finding. All
thresholds live in :class:`Thresholds`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bncheck.discover import BNLayer
from bncheck.drift import Drift, DriftThresholds
from bncheck.layer_config import TRACED, is_exported
from bncheck.loaders.dtypes import FLOATING, INTEGER
from bncheck.pickle_globals import Risk, grade_global
from bncheck.read import LayerData, LayerStack, stack_layers
from bncheck.report import Finding, LayerConfig, ModelConfig, RuleInfo, Severity


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against, with its default."""

    # BN008: a variance at or below this makes the layer divide by about sqrt(eps).
    min_variance: float = 1e-8
    # BN009: the layer's eps, which a state dict does not store; PyTorch's default.
    eps: float = 1e-5
    # BN009: a float16/bfloat16 statistic beyond this fraction of the dtype's largest finite value.
    low_precision_max_fraction: float = 0.25
    # BN009: rounding the stored mean to its dtype may shift normalised outputs by more than this many std.
    low_precision_rounding_std: float = 0.05
    # BN013: a layer updated fewer than 1/ratio times as often as the most updated layer of its model.
    count_spread_ratio: float = 2.0
    # BN014: a momentum at or above this follows Keras' convention (the weight of the old value), not PyTorch's.
    max_momentum: float = 0.5
    # BN015: an eps above this looks like a momentum (or a typo); TF ports' 1e-3 is well below it.
    max_eps: float = 0.01
    # Offending channels listed per finding (the count is always exact).
    max_channels_listed: int = 64
    # BN012: drift between stored and recomputed statistics that counts as stale (beyond sampling noise too).
    drift: DriftThresholds = field(default_factory=DriftThresholds)


@dataclass(frozen=True)
class Hit:
    message: str
    tensor: str | None = None
    channels: Sequence[int] = ()
    # a rule whose severity depends on the case (BN014: warning, or error outside (0, 1]); None: the rule's
    severity: Severity | None = None


@dataclass(frozen=True)
class LayerDrift:
    """A checkpoint layer's stored statistics compared with statistics recomputed on sample data."""

    layer: BNLayer
    module: str
    drift: Drift
    silenced: bool = False


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    summary: str
    hint: str
    scope: Literal["layer", "config", "model", "file", "recompute"]
    check: Callable[..., Iterable[Any]] = field(repr=False)
    # layer rules: which of a file's layers the rule may report, for all layers at once (True where it might: the
    # rule itself decides); None checks every layer. A screen may say True too often, never too rarely.
    screen: Screen | None = field(default=None, repr=False)
    # layer rules that read only the layer's metadata (tensor names, dtypes, shapes), never values: checked once
    # per distinct metadata, their hits shared by the layers that have it
    metadata_only: bool = False

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.check) or self.summary

    @property
    def info(self) -> RuleInfo:
        name = "".join(part.capitalize() for part in self.check.__name__.split("_"))
        return RuleInfo(code=self.code, name=name, severity=self.severity, summary=self.summary, doc=self.doc)


Screen = Callable[[LayerStack, "Thresholds"], np.ndarray]
RULES: dict[str, Rule] = {}


def rule(
    code: str,
    severity: Severity,
    summary: str,
    hint: str,
    scope: Literal["layer", "config", "model", "file", "recompute"] = "layer",
    *,
    screen: Screen | None = None,
    metadata_only: bool = False,
) -> Callable[[Callable[..., Iterable[Any]]], Callable[..., Iterable[Any]]]:
    def register(check: Callable[..., Iterable[Any]]) -> Callable[..., Iterable[Any]]:
        assert code not in RULES, f"rule code {code} registered twice"
        RULES[code] = Rule(code, severity, summary, hint, scope, check, screen, metadata_only)
        return check

    return register


def _channels(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask.reshape(-1))]


def _nonfinite(stack: LayerStack, name: str) -> np.ndarray:
    return stack.any_channel(name, lambda values: ~np.isfinite(values))


def _uncounted(stack: LayerStack) -> np.ndarray:
    return np.array([count in (None, 0) for count in stack.counts], dtype=bool)


def _low_precision_dtype(stack: LayerStack, name: str) -> np.ndarray:
    return np.isin(stack.dtypes[name], list(_LOW_PRECISION))


def _stats(data: LayerData) -> Iterator[tuple[str, np.ndarray]]:
    for name in ("running_mean", "running_var"):
        values = data.floats(name)
        if values is not None:
            yield name, values


@rule(
    "BN001",
    Severity.ERROR,
    "NaN or infinite running_mean / running_var",
    "training diverged, or an fp16 cast overflowed; restore an earlier checkpoint or recalibrate the statistics",
    screen=lambda stack, t: _nonfinite(stack, "running_mean") | _nonfinite(stack, "running_var"),
)
def nonfinite_stats(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: running_mean or running_var holds NaN, +Inf or -Inf in some channels.

    Why: in eval() mode every output of those channels becomes NaN (or 0 / NaN for an infinite variance), and the
    NaN spreads through every later layer. Causes: training that diverged (a NaN loss poisons the running averages
    on the next forward pass), or casting a model whose running_var exceeds 65504 to float16 (model.half()).

    Fix: go back to the last checkpoint whose statistics are finite, or recompute the statistics on clean data in
    train mode (torch.optim.swa_utils.update_bn, or bncheck recalibrate); keep BatchNorm in float32 when exporting
    to fp16.
    """
    for name, values in _stats(data):
        bad = ~np.isfinite(values)
        if bad.any():
            kinds = [
                f"{int(n)} {label}"
                for n, label in (
                    (np.isnan(values).sum(), "NaN"),
                    (np.isposinf(values).sum(), "+Inf"),
                    (np.isneginf(values).sum(), "-Inf"),
                )
                if n
            ]
            yield Hit(f"{name} has {int(bad.sum())} non-finite value(s): {', '.join(kinds)}", name, _channels(bad))


@rule(
    "BN002",
    Severity.ERROR,
    "negative running_var",
    "the statistics were edited, merged or quantised wrongly; recompute them on data",
    screen=lambda stack, t: stack.any_channel("running_var", lambda v: v < 0),
)
def negative_variance(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: running_var is negative in some channels.

    Why: a variance cannot be negative; PyTorch never produces one, so the tensor was written by something else
    (a manual edit, a weight-averaging or merging script that subtracted statistics, a broken quantisation or
    conversion). In eval() mode sqrt(var + eps) is NaN once var < -eps, and huge outputs when var is just above -eps.

    Fix: recompute the statistics on representative data (torch.optim.swa_utils.update_bn or bncheck
    recalibrate) and find the tool that wrote them.
    """
    values = data.floats("running_var")
    if values is not None:
        negative = values < 0
        if negative.any():
            yield Hit(
                f"running_var is negative in {int(negative.sum())} channel(s), min {values[negative].min():.4g}",
                "running_var",
                _channels(negative),
            )


@rule(
    "BN003",
    Severity.ERROR,
    "statistics or affine parameters have inconsistent shapes",
    "the tensors do not belong to one layer (a bad merge, edit or key mapping); re-export the layer",
    metadata_only=True,
)
def shape_mismatch(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: running_mean or running_var is not 1-D, or the lengths of running_mean, running_var, weight and bias
    differ.

    Why: a BatchNorm layer of C channels stores C of each. Anything else means the tensors were mixed up between
    layers or reshaped by a conversion; load_state_dict(strict=True) refuses the file, and strict=False leaves the
    layer with its initial statistics.

    Fix: re-export the checkpoint from the model, or repair the key mapping of the conversion script.
    """
    shapes = {name: ref.shape for name, ref in data.layer.tensors.items() if name != "num_batches_tracked"}
    not_1d = [f"{name} has shape {list(shape)}" for name, shape in shapes.items() if len(shape) != 1]
    if not_1d:
        yield Hit("; ".join(not_1d) + " (expected one value per channel)")
    lengths = {name: shape[0] for name, shape in shapes.items() if len(shape) == 1}
    if len(set(lengths.values())) > 1:
        yield Hit("lengths differ: " + ", ".join(f"{name} {n}" for name, n in lengths.items()))


@rule(
    "BN004",
    Severity.ERROR,
    "running statistics are not a floating-point dtype",
    "the statistics were cast to an integer type by a conversion script; re-export them as float32",
    metadata_only=True,
)
def non_float_stats(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: running_mean or running_var is stored as an integer, boolean or complex tensor.

    Why: truncated statistics normalise with the wrong mean and variance; torch casts them back silently when the
    state dict is loaded, so nothing complains at load time.

    Fix: re-export the checkpoint without casting buffers (a blanket .to(dtype) or a quantisation script that
    treated buffers as weights is the usual cause).
    """
    for name in ("running_mean", "running_var"):
        dtype = data.dtype(name)
        if dtype is not None and dtype not in FLOATING:
            yield Hit(f"{name} is {dtype}", name)


@rule(
    "BN005",
    Severity.ERROR,
    "num_batches_tracked is not a non-negative integer scalar",
    "the counter was edited or cast; set it to the number of training batches, or recompute the statistics",
    screen=lambda stack, t: np.array([count is None or count < 0 for count in stack.counts], dtype=bool),
)
def invalid_count(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: num_batches_tracked is not an integer, is not a single value, or is negative.

    Why: PyTorch stores it as an int64 scalar counting the training batches. With momentum=None the layer uses it to
    form a cumulative average, so a corrupt counter corrupts the next update; a float or negative counter shows the
    checkpoint was rewritten by a tool that did not understand it.

    Fix: restore the counter (an int64 scalar, usually the number of training steps) or recompute the statistics.
    """
    dtype = data.dtype("num_batches_tracked")
    array = data.arrays.get("num_batches_tracked")
    if dtype is None or array is None:
        return
    if dtype not in INTEGER:
        yield Hit(f"num_batches_tracked is {dtype}, not an integer", "num_batches_tracked")
    elif array.size != 1:
        yield Hit(f"num_batches_tracked has shape {list(array.shape)}, not a scalar", "num_batches_tracked")
    elif int(array.reshape(())) < 0:
        yield Hit(f"num_batches_tracked is negative ({int(array.reshape(()))})", "num_batches_tracked")


@rule(
    "BN006",
    Severity.ERROR,
    "running_mean or running_var is missing while the other is present",
    "the file was filtered or converted incompletely; re-export it with every buffer",
    metadata_only=True,
)
def missing_stat(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: the layer has running_mean but no running_var, or the reverse.

    Why: load_state_dict(strict=False) silently skips the missing tensor and the layer keeps its initial value
    (mean 0 or variance 1), which is wrong for every trained model; strict=True refuses the file.

    Fix: re-export the checkpoint with all buffers (check any key filter in the export script).
    """
    present = [name for name in ("running_mean", "running_var") if name in data.layer.tensors]
    if len(present) == 1:
        missing = "running_var" if present == ["running_mean"] else "running_mean"
        yield Hit(f"{missing} is missing but {present[0]} is present", missing)


@rule(
    "BN007",
    Severity.WARNING,
    "statistics were never updated (mean 0, variance 1)",
    "no train-mode forward pass reached this layer (saved untrained, or trained in eval()); recalibrate on data",
    screen=lambda stack, t: _uncounted(stack) & stack.all_channels("running_mean", lambda v: v == 0),
)
def never_updated(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: running_mean is all 0 and running_var all 1 (their initial values), and num_batches_tracked is 0 or
    absent.

    Why: PyTorch updates the stored statistics only in train mode, as running = (1 - momentum) * running +
    momentum * batch_statistic (momentum, 0.1 by default, weighs the new batch: the opposite of Keras' 0.99), and
    uses them only in eval() mode. This layer never saw a train-mode forward pass: the model was saved right after
    construction, trained with BatchNorm frozen by eval(), or trained with track_running_stats=False set after
    construction (the layer then normalises with batch statistics in train mode and never updates the stored
    ones). In eval() mode it then
    normalises with mean 0 / variance 1, which is wrong for almost any data. Models converted from Caffe or
    folded by an exporter can legitimately carry identity statistics.

    Fix: run the model in train mode over representative data (torch.optim.swa_utils.update_bn, or bncheck
    recalibrate) before saving.
    """
    mean, var = data.floats("running_mean"), data.floats("running_var")
    count = data.count()
    if mean is None or var is None or mean.size == 0 or (count not in (None, 0)):
        return
    if np.all(mean == 0) and np.all(var == 1):
        counted = "num_batches_tracked 0" if count == 0 else "no num_batches_tracked"
        yield Hit(f"running_mean all 0, running_var all 1 and {counted}: the values at construction")


@rule(
    "BN008",
    Severity.WARNING,
    "zero or near-zero running_var",
    "a constant (or dead) input channel; check the data pipeline or drop the feature",
    screen=lambda stack, t: stack.any_channel("running_var", lambda v: (v >= 0) & (v <= t.min_variance)),
)
def near_zero_variance(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: running_var is at or below min_variance (1e-8 by default) in some channels.

    Why: the layer divides by sqrt(var + eps), about sqrt(eps) = 0.003 for PyTorch's default eps, so the slightest
    difference between training and inference inputs in that channel is amplified several hundred times. The usual
    cause is an input feature that was constant in the training data (a BatchNorm1d on tabular inputs), or a
    channel whose activations are always zero (a dead ReLU unit).

    Fix: remove or fix the constant feature, or check that inference data really is constant there too.
    """
    var = data.floats("running_var")
    if var is not None:
        tiny = (var >= 0) & (var <= t.min_variance)
        if tiny.any():
            yield Hit(
                f"running_var <= {t.min_variance:g} in {int(tiny.sum())} channel(s)",
                "running_var",
                _channels(tiny),
            )


_LOW_PRECISION = {
    "float16": (65504.0, 10),
    "bfloat16": (3.3895313892515355e38, 7),
}  # max finite, mantissa bits


@rule(
    "BN009",
    Severity.WARNING,
    "float16/bfloat16 statistics near overflow or too coarse for their scale",
    "keep BatchNorm buffers in float32 when converting the model to half precision",
    screen=lambda stack, t: _low_precision_dtype(stack, "running_mean") | _low_precision_dtype(stack, "running_var"),
)
def low_precision(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: the statistics are stored in float16 or bfloat16 and either come close to the dtype's largest value
    (a quarter of it by default: float16 overflows at 65504), or the stored mean is so large relative to the
    channel's standard deviation that rounding it to the dtype shifts normalised outputs by more than 0.05 std.

    Why: float16 running_var overflows to inf as soon as activations grow a little (a model.half() export of a
    network whose variance exceeds 65504 is already broken); bfloat16 keeps only 8 significant bits, so a channel
    with mean 2000 and std 3 (a year column, a raw sensor offset) is stored with an error of several std.

    Fix: keep BatchNorm layers in float32 when exporting (autocast and most exporters already do), or normalise the
    inputs so that the statistics are of order 1.
    """
    for name, values in _stats(data):
        dtype = data.dtype(name)
        if dtype not in _LOW_PRECISION:
            continue
        largest, _ = _LOW_PRECISION[dtype]
        near = np.isfinite(values) & (np.abs(values) >= t.low_precision_max_fraction * largest)
        if near.any():
            yield Hit(
                f"{name} ({dtype}) reaches {np.abs(values[near]).max():.4g}, within "
                f"{1 / t.low_precision_max_fraction:g}x of the largest {dtype} {largest:.5g}",
                name,
                _channels(near),
            )
    mean, var, dtype = data.floats("running_mean"), data.floats("running_var"), data.dtype("running_mean")
    if mean is None or var is None or mean.shape != var.shape or dtype not in _LOW_PRECISION:
        return
    _, mantissa_bits = _LOW_PRECISION[dtype]
    with np.errstate(invalid="ignore", divide="ignore"):
        exponent = np.floor(np.log2(np.abs(mean), where=mean != 0, out=np.full_like(mean, -np.inf)))
        half_step = np.exp2(exponent - mantissa_bits) / 2
        shift = half_step / np.sqrt(np.maximum(var, 0) + t.eps)
    coarse = np.isfinite(shift) & (shift > t.low_precision_rounding_std)
    if coarse.any():
        yield Hit(
            f"running_mean in {dtype} is rounded by up to {np.nanmax(shift[coarse]):.3g} std of its channel",
            "running_mean",
            _channels(coarse),
        )


@rule(
    "BN010",
    Severity.WARNING,
    "num_batches_tracked is missing",
    "the checkpoint predates PyTorch 0.4.1 or the counter was stripped; harmless unless momentum=None",
    metadata_only=True,
)
def missing_count(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: the layer has running statistics but no num_batches_tracked.

    Why: PyTorch has saved the counter since 0.4.1. Without it the file was written by an older PyTorch or by a
    script that dropped integer buffers; load_state_dict(strict=True) then fails on a current model
    (strict=False silently keeps the counter at 0), and layers with momentum=None, which average cumulatively by
    that counter, restart their average. FrozenBatchNorm2d (torchvision, detectron2), whose statistics never change,
    has no counter by design: it is not reported where the file names that class, nor in a state dict whose layers
    without a counter hold exactly its buffers (weight, bias, running_mean, running_var) while other BatchNorm
    layers of the file carry counters or they make up a whole backbone; the report says so in one note instead.

    Fix: re-export from a current PyTorch, or add the counter back (an int64 scalar).
    """
    if data.layer.batch_counter and data.layer.frozen is None and "num_batches_tracked" not in data.layer.tensors:
        yield Hit("no num_batches_tracked next to the running statistics")


@rule(
    "BN011",
    Severity.ERROR,
    "NaN or infinite affine weight / bias",
    "training diverged; restore an earlier checkpoint",
    screen=lambda stack, t: _nonfinite(stack, "weight") | _nonfinite(stack, "bias"),
)
def nonfinite_affine(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: the layer's learnable weight (gamma) or bias (beta) holds NaN or ±Inf.

    Why: the layer's output is NaN in both train and eval mode whatever the statistics say; it means the
    optimiser stepped on a NaN or infinite gradient.

    Fix: restore the last checkpoint with finite parameters; lower the learning rate or clip gradients.
    """
    for name in ("weight", "bias"):
        values = data.floats(name)
        if values is not None:
            bad = ~np.isfinite(values)
            if bad.any():
                yield Hit(f"{name} has {int(bad.sum())} non-finite value(s)", name, _channels(bad))


@rule(
    "BN012",
    Severity.ERROR,
    "stored statistics disagree with statistics recomputed on sample data",
    "recalibrate if the weights were trained or edited under batch statistics; if BatchNorm was frozen on purpose "
    "during fine-tuning, the weights fit the stored statistics: silence the layer instead",
    scope="recompute",
)
def stale_statistics(drifts: Sequence[LayerDrift], t: Thresholds) -> Iterator[tuple[LayerDrift, Hit]]:
    """What: running the model (given with --model) over sample data (--data) gives BatchNorm input statistics far
    from the stored ones: the standardised mean shift |mean_stored - mean_new| / sqrt(var_new + eps) or the
    |log variance ratio| exceeds a practical limit (median or worst channel) and also exceeds what the number of
    samples can explain by chance.

    Why: the stored statistics do not describe this data under these weights, so eval() outputs differ from what
    the network computed in training. Causes: a fine-tune run with track_running_stats flipped off (the layers
    normalised with batch statistics and never updated the stored ones), weights averaged (SWA, model soups) or
    pruned after the statistics were collected, EMA weights saved with the raw model's statistics, or data that
    really differ from the training data. Drift does not say who is wrong: a model fine-tuned with BatchNorm
    deliberately frozen in eval() shows drift too, but its weights adapted to the frozen statistics and
    recalibrating it makes it worse.

    Fix: for weights trained or edited under batch statistics, write recalibrated statistics with
    bncheck recalibrate (or torch.optim.swa_utils.update_bn) on representative data. For a deliberate frozen-BN
    fine-tune, silence the layer (--skip-layer) or the file.
    """
    for item in drifts:
        reasons = item.drift.reasons(t.drift)
        if reasons and not item.silenced:
            yield item, Hit(f"stale for this data ({item.drift.samples or 0} samples): " + "; ".join(reasons))


@rule(
    "BN013",
    Severity.INFO,
    "layers of one model were updated very different numbers of times",
    "part of the model was frozen in eval() or added later; check that this was intended",
    scope="model",
)
def count_spread(layers: Sequence[LayerData], t: Thresholds) -> Iterator[tuple[LayerData, Hit]]:
    """What: within one model (one state dict), some BatchNorm layers have a num_batches_tracked far below the
    most-updated layer's (less than half by default).

    Why: every train-mode forward pass updates every BatchNorm it goes through, so in a model trained as a whole
    the counts are equal. A spread means part of the network was frozen with eval() while the rest trained, a head
    was replaced and trained alone, or branches run conditionally. The statistics of the less-updated layers may
    not match the weights around them. Averaged (EMA/SWA) copies and InstanceNorm layers are skipped: their counts
    carry no such meaning.

    Fix: if the freeze was unintended, recalibrate the statistics of the whole model on representative data.
    """
    by_source: dict[str, list[tuple[LayerData, int]]] = {}
    for data in layers:
        count = data.count()
        if count is None or data.layer.averaged or data.layer.kind.startswith("InstanceNorm"):
            continue
        by_source.setdefault(data.layer.source, []).append((data, count))
    for members in by_source.values():
        most = max((count for _, count in members), default=0)
        for data, count in members:
            if count * t.count_spread_ratio < most:
                yield (
                    data,
                    Hit(
                        f"num_batches_tracked is {count}, while the most-updated layer of this model has {most}",
                        "num_batches_tracked",
                    ),
                )


def _value(config: LayerConfig, name: str) -> tuple[Any, str] | None:
    setting = getattr(config, name)
    return None if setting is None else (setting.value, setting.source)


@rule(
    "BN014",
    Severity.WARNING,
    "momentum outside PyTorch's convention (error outside (0, 1])",
    "PyTorch's momentum is the new batch's weight: a Keras momentum m is PyTorch 1 - m (0.99 -> 0.01); "
    "then recompute the statistics",
    scope="config",
)
def keras_momentum(config: LayerConfig, t: Thresholds) -> Iterator[Hit]:
    """What: the layer's momentum, as the file records it (a pickled module, a TorchScript constant, a traced
    batch_norm call, or batch_norm_momentum in a config.json beside the weights), is at or above max_momentum (0.5
    by default), or outside (0, 1] (an error).

    Why: in train mode PyTorch updates running = (1 - momentum) * running + momentum * batch_statistic: momentum
    (0.1 by default) is the weight of the NEW batch, and a higher momentum adapts faster, not slower. Keras and
    TensorFlow use the opposite convention, where momentum (0.99 by default) is the weight of the old value: Keras
    0.99 is PyTorch 0.01. Copied into PyTorch, 0.99 keeps 1% of the history: the stored statistics are 99% those of
    the last training batch, and eval() normalises every input with one batch's noisy statistics. transformers'
    EfficientNet passes its config's batch_norm_momentum (0.99 by default) straight to nn.BatchNorm2d. A momentum of
    0 never updates the statistics, a negative one moves them away from the data and one above 1 overshoots every
    batch and can diverge. momentum=None (a cumulative average weighted by num_batches_tracked) is fine.

    Fix: use PyTorch's convention (1 - m for a Keras momentum m, or the default 0.1). The statistics already stored
    were made with the wrong momentum: recompute them in train mode on representative data
    (torch.optim.swa_utils.update_bn, or bncheck recalibrate).
    """
    found = _value(config, "momentum")
    if found is None or found[0] is None:
        return
    momentum, source = found
    if not 0 < momentum <= 1:
        effect = (
            "the statistics become NaN on the first train-mode batch"
            if math.isnan(momentum)
            else "the stored statistics never move toward the data"
            if momentum <= 0
            else "every update overshoots the batch statistic and can diverge"
        )
        yield Hit(f"momentum {momentum:g} ({source}) is outside (0, 1]: {effect}", severity=Severity.ERROR)
    elif momentum >= t.max_momentum:
        yield Hit(
            f"momentum {momentum:g} ({source}): PyTorch weighs the new batch by momentum, so the stored statistics "
            f"keep {(1 - momentum) * 100:.3g}% of their history (Keras {momentum:g} is PyTorch {1 - momentum:.3g})"
        )


@rule(
    "BN015",
    Severity.WARNING,
    "eps implausible: <= 0, or large enough to look like a momentum (error when <= 0)",
    "eps is only added to the variance: use 1e-5 (1e-3 for TensorFlow ports) and pass momentum by keyword",
    scope="config",
)
def implausible_eps(config: LayerConfig, t: Thresholds) -> Iterator[Hit]:
    """What: the layer's eps, as the file records it, is at or below 0 (an error), or above max_eps (0.01 by
    default).

    Why: eps is only the numerical constant added to the variance before the square root, y = (x - mean) /
    sqrt(var + eps) * weight + bias; it is never a momentum and takes no part in updating the running statistics.
    With eps = 0 a channel whose variance is 0 (a constant or dead channel) divides by zero, and a negative eps
    takes the square root of a negative number: NaN. A large eps (0.1, 0.9) shrinks every channel whose variance is
    not far above it, so the layer no longer standardises. The usual cause is a momentum passed by position:
    eps is BatchNorm's second parameter, so nn.BatchNorm1d(64, 0.9) sets eps=0.9 and keeps momentum 0.1. PyTorch's
    default is 1e-5 and Keras' 1e-3; TensorFlow ports with 1e-3 are fine.

    Fix: pass momentum by keyword (nn.BatchNorm1d(64, momentum=0.1)) and keep eps at 1e-5, or at the value of the
    framework the weights come from. The weights were trained with this eps, so check the model's accuracy after
    changing it.
    """
    found = _value(config, "eps")
    if found is None or found[0] is None:
        return
    eps, source = found
    if not eps > 0:
        effect = "a channel of variance 0 divides by zero" if eps == 0 else "sqrt(var + eps) can be NaN"
        yield Hit(f"eps {eps:g} ({source}) is not positive: {effect}", severity=Severity.ERROR)
    elif eps > t.max_eps:
        yield Hit(
            f"eps {eps:g} ({source}) is above {t.max_eps:g}: it looks like a momentum passed as eps, and it shrinks "
            "every channel whose variance is not far above it"
        )


@rule(
    "BN016",
    Severity.WARNING,
    "saved in training mode (error for a traced graph with training=True baked in)",
    "call model.eval() before torch.save(model), scripting or tracing; re-trace a traced model in eval mode",
    scope="config",
)
def saved_in_training_mode(config: LayerConfig, t: Thresholds) -> Iterator[Hit]:
    """What: a pickled (torch.save(model)) or scripted (torch.jit.script) layer was saved with training=True, the
    mode it is in during and right after training; or a traced graph (torch.jit.trace) has training=True baked into
    the layer's batch_norm call (an error).

    Why: BatchNorm uses its stored statistics only in eval(). A module loaded from a pickle or a TorchScript
    archive keeps the mode it was saved in, so whoever loads it and forgets eval() gets outputs normalised with each
    batch's own statistics (they depend on what else is in the batch, and BatchNorm1d refuses a batch of one
    sample), and every forward pass moves the stored statistics toward that batch. torch.jit.trace records the
    operations it saw: a model traced in train mode calls batch_norm with training=True for good, and eval() on the
    traced module changes nothing. It normalises with batch statistics and overwrites the stored ones on every
    call, even after eval().

    Fix: call model.eval() before torch.save(model), torch.jit.script or torch.jit.trace. For a pickled or scripted
    model, eval() after loading is enough; a traced one must be traced again in eval mode.
    """
    found = _value(config, "training")
    if found is None or found[0] is not True or is_exported(found[1]):
        return  # an exported graph's training flag is BN019's
    if found[1] == TRACED:
        yield Hit(
            "traced in training mode: its batch_norm call has training=True baked in, so it normalises with batch "
            "statistics and overwrites the stored ones even after eval()",
            severity=Severity.ERROR,
        )
    else:
        source = found[1]
        yield Hit(f"saved in training mode (training=True, {source}): it uses batch statistics until eval() is called")


@rule(
    "BN017",
    Severity.WARNING,
    "tracking switched off on a layer that holds statistics",
    "inference means model.eval(), not this flag: set track_running_stats back to True; recompute the statistics "
    "if training went on with it off",
    scope="config",
)
def tracking_switched_off(config: LayerConfig, t: Thresholds) -> Iterator[Hit]:
    """What: the layer holds running_mean and running_var, but its track_running_stats attribute is False. A layer
    built with track_running_stats=False has no statistics to save, so the flag was switched off afterwards,
    often "for inference".

    Why: the flag does not put a layer in inference mode. With it off, a layer in train mode normalises with batch
    statistics and stops updating the stored ones; in eval() it still uses the stored ones whatever the flag says.
    So the stored statistics stopped following the weights when the flag was flipped: if training went on, they
    describe older weights (BN012 measures by how much, given --model and --data), and a model loaded from this file
    behaves in train mode as if it had no statistics.

    Fix: set track_running_stats back to True and call model.eval() for inference. If the model was trained further
    with the flag off, recompute the statistics on representative data (bncheck recalibrate, or
    torch.optim.swa_utils.update_bn).
    """
    found = _value(config, "track_running_stats")
    if found is not None and found[0] is False:
        yield Hit(
            f"track_running_stats is False ({found[1]}): in train mode the layer normalises with batch statistics "
            "and no longer updates the stored ones; eval() still uses them"
        )


@rule(
    "BN018",
    Severity.ERROR,
    "statistics hold no data",
    "a lazy module saved before its dry run, a meta-device model or a freed (FSDP) storage; save real weights",
    metadata_only=True,
)
def no_data(data: LayerData, t: Thresholds) -> Iterator[Hit]:
    """What: the file names the layer's tensors but stores no values for them. Three mechanisms write such files:
    a LazyBatchNorm1d/2d/3d saved before its first forward pass (torch pickles each UninitializedBuffer and
    UninitializedParameter as its class alone: no shape, no values, num_features 0); a model built on the meta
    device (with torch.device("meta"), accelerate's init_empty_weights) and saved before its weights were
    materialised (torch writes a meta tensor as its dtype, size and stride, with no storage); and a storage resized
    to zero (as FSDP frees unsharded parameters) saved behind its original, non-empty shape.

    Why: there are no statistics to normalise with. load_state_dict of a meta tensor into a real model raises
    "Cannot copy out of meta tensor; no data!"; torch.load refuses the zero-size storage ("Trying to resize storage
    that is not resizable"); uninitialised lazy tensors load only into a lazy module, whose first forward pass
    then creates running_mean 0 and running_var 1, so in eval() it silently normalises with statistics that never
    saw data. The file looks like a checkpoint and holds none of the model's state.

    Fix: run one forward pass on a real batch (the lazy modules' dry run) and train or load real weights before
    saving; materialise a meta-device model (to_empty(device=...) and then load or initialise its weights); save an
    FSDP model through its state-dict API (get_model_state_dict / FULL_STATE_DICT), never while its parameters are
    freed.
    """
    empty: dict[str, list[str]] = {}
    for name, ref in data.layer.tensors.items():
        if ref.no_data is not None:
            empty.setdefault(ref.no_data, []).append(name)
    if empty:
        names = [name for group in empty.values() for name in group]
        yield Hit(
            "no values stored for " + "; ".join(f"{', '.join(group)} ({why})" for why, group in empty.items()),
            names[0] if len(names) == 1 else None,
        )


@rule(
    "BN019",
    Severity.ERROR,
    "the exported graph normalises with batch statistics at inference",
    "export from model.eval(): torch.export.export and torch.onnx.export record the mode the model is in",
    scope="config",
)
def exported_in_training_mode(config: LayerConfig, t: Thresholds) -> Iterator[Hit]:
    """What: a deployment artifact runs the layer in training mode: a torch.export program (.pt2) whose batch_norm
    call has training=True, or an ONNX BatchNormalization node with training_mode=1, the extra running-statistics
    outputs (opsets 7-13) or is_test=0 (opsets 1-6).

    Why: an exported graph is what runs in production, and its mode is fixed in the graph: there is no eval() to
    call. A runtime executing it (ONNX Runtime, an AOTInductor build) normalises each input with its own batch's
    statistics, so one sample's output depends on what else is in the batch, a batch of one is standardised to
    beta, and the stored statistics are never used. Exporters record the mode the model was in when exported.

    Fix: call model.eval() before torch.export.export or torch.onnx.export (the TorchScript-based exporter also
    takes training=torch.onnx.TrainingMode.EVAL), then export again.
    """
    found = _value(config, "training")
    if found is not None and found[0] is True and is_exported(found[1]):
        yield Hit(
            f"training=True in the exported graph ({found[1]}): at inference it normalises each batch with its own "
            "statistics and ignores the stored ones"
        )


@rule(
    "BN101",
    Severity.ERROR,
    "the pickle calls a global that can execute code",
    "do not load this file with torch.load(weights_only=False); get the weights from a trusted source",
    scope="file",
)
def dangerous_globals(globals_named: Sequence[str], t: Thresholds) -> Iterator[Hit]:
    """What: a pickle of the checkpoint names a global that runs code, writes files or reaches the network when
    torch unpickles it: os.system, builtins.eval, subprocess.Popen, runpy.run_path, importlib.import_module,
    torch.storage._load_from_bytes (a nested torch.load), numpy.load, logging.FileHandler, zipfile.ZipFile, a
    dotted path such as gzip:os.system (protocol 4 walks the name as attributes, and gzip imported os) or
    __main__:__builtins__.eval... Every pickle of the file counts: data.pkl, TorchScript's constants.pkl, the
    header pickles of a legacy file, every shard of a sharded checkpoint.

    Why: torch.load(weights_only=False), and every PyTorch before 2.6 by default, resolves and calls such globals
    while loading, with the rights of the user who loads the file. bncheck read the file without running any of
    it, so the statistics reported beside this finding are what the file really holds. Names are judged against
    an allow-list (bncheck/pickle_globals.py explains each entry): a name that is not known to be harmless and not
    known to run code is BN102 instead.

    Fix: treat the file as hostile; do not load it with weights_only=False. Obtain the weights from a trusted
    source, preferably as safetensors.
    """
    dangerous = [name for name in globals_named if grade_global(name) is Risk.CODE_EXECUTION]
    if dangerous:
        yield Hit("pickle names " + ", ".join(dangerous) + "; bncheck did not run it")


@rule(
    "BN102",
    Severity.WARNING,
    "the pickle names a global that is not known to be harmless",
    "load the file with torch.load(weights_only=True), or only if you trust the code the names point to",
    scope="file",
)
def unknown_globals(globals_named: Sequence[str], t: Thresholds) -> Iterator[Hit]:
    """What: a pickle of the checkpoint names a global (a class or function) that is neither on bncheck's
    allow-list of harmless names (torch's tensor and storage rebuilding, dtypes, torch.nn layers, numpy arrays,
    OrderedDict, argparse.Namespace, pathlib paths, omegaconf containers, Lightning's AttributeDict, TorchScript
    classes...) nor a known way to run code. The commonest case is a fully pickled model, torch.save(model), whose
    class lives in the user's code (__main__.MLP, my_project.models.ResNet); others are a library's config class
    or an optimizer object.

    Why: torch.load(weights_only=False) imports the module and calls the class or function with arguments the
    file chooses. Whether that is harmless depends on code bncheck does not read: a class whose constructor or
    __setstate__ opens a file, starts a process or evaluates a string runs it for whoever crafted the file.
    torch.load(weights_only=True), the default since PyTorch 2.6, refuses such a file unless the name is
    allowed with torch.serialization.add_safe_globals.

    Fix: save the state dict (model.state_dict()) rather than the model object, or safetensors; then nothing but
    tensors needs unpickling. If the names are your own classes and the file comes from you, load it with
    weights_only=True and torch.serialization.add_safe_globals([...]), or ignore BN102 for that path.
    """
    unknown = [name for name in globals_named if grade_global(name) is Risk.UNKNOWN]
    if unknown:
        yield Hit("pickle names " + ", ".join(unknown) + "; not known to be harmless, bncheck did not run it")


def _finding(rule_: Rule, hit: Hit, t: Thresholds, layer: BNLayer | None = None) -> Finding:
    return Finding(
        code=rule_.code,
        severity=hit.severity or rule_.severity,
        message=hit.message,
        hint=rule_.hint,
        layer=layer.name if layer else None,
        source=layer.source if layer else None,
        tensor=hit.tensor,
        channels=tuple(hit.channels[: t.max_channels_listed]),
        channel_count=len(hit.channels),
    )


def run_checks(
    layers: Sequence[LayerData],
    globals_named: Sequence[str] = (),
    *,
    drifts: Sequence[LayerDrift] = (),
    model_configs: Sequence[ModelConfig] = (),
    thresholds: Thresholds | None = None,
    stack: LayerStack | None = None,
) -> list[Finding]:
    """Every finding of every rule: file rules first (the pickle's globals, then the configuration rules on the
    model-wide settings of ``model_configs``), then per layer in file order (layer, configuration, model and
    recompute rules). ``stack`` is ``stack_layers(layers)`` when the caller has it already.

    The findings are those of every rule called on every layer; but a layer rule runs only on the layers its screen
    lets through, a metadata-only rule once per distinct metadata, and a configuration rule once per distinct
    configuration, so that a file of thousands of healthy layers costs a few numpy calls per rule.
    """
    t = thresholds or Thresholds()
    findings = [_finding(r, hit, t) for r in RULES.values() if r.scope == "file" for hit in r.check(globals_named, t)]
    findings += [
        _finding(r, hit, t)
        for model_config in model_configs
        for r in RULES.values()
        if r.scope == "config"
        for hit in r.check(model_config.settings, t)
    ]
    stack = stack if stack is not None else stack_layers(layers)
    per_layer: list[list[Finding]] = [[] for _ in layers]
    index = {id(data.layer): i for i, data in enumerate(layers)}
    for r in RULES.values():
        if r.scope == "layer":
            for i, hit in _layer_hits(r, layers, stack, t):
                per_layer[i].append(_finding(r, hit, t, layers[i].layer))
        elif r.scope == "config":
            for i, hit in _config_hits(r, layers, stack, t):
                per_layer[i].append(_finding(r, hit, t, layers[i].layer))
        elif r.scope == "model":
            for data, hit in r.check(layers, t):
                per_layer[index[id(data.layer)]].append(_finding(r, hit, t, data.layer))
        elif r.scope == "recompute":
            for item, hit in r.check(drifts, t):
                per_layer[index[id(item.layer)]].append(_finding(r, hit, t, item.layer))
    for found in per_layer:
        findings.extend(sorted(found, key=lambda f: f.code))
    return findings


def _layer_hits(r: Rule, layers: Sequence[LayerData], stack: LayerStack, t: Thresholds) -> Iterator[tuple[int, Hit]]:
    """A layer rule's hits by layer index, in layer order."""
    indices = range(len(layers)) if r.screen is None else np.flatnonzero(r.screen(stack, t)).tolist()
    known: dict[Hashable, list[Hit]] = {}
    for i in indices:
        if r.metadata_only:
            signature = stack.signatures[i]
            hits = known.get(signature)
            if hits is None:
                hits = known[signature] = list(r.check(layers[i], t))
        else:
            hits = list(r.check(layers[i], t))
        for hit in hits:
            yield i, hit


def _config_hits(r: Rule, layers: Sequence[LayerData], stack: LayerStack, t: Thresholds) -> Iterator[tuple[int, Hit]]:
    """A configuration rule's hits by layer index, checked once for all the layers whose file records no
    configuration (every layer of a state dict)."""
    for i in stack.configured:
        for hit in r.check(layers[i].config, t):
            yield i, hit
    unknown = list(r.check(LayerConfig(), t))
    if unknown:
        configured = set(stack.configured)
        for i in range(len(layers)):
            if i not in configured:
                for hit in unknown:
                    yield i, hit
