"""The results of an inspection as plain, frozen data: no I/O, no formatting, no numpy."""

from __future__ import annotations

import array
from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    """How bad a finding is, ordered INFO < WARNING < ERROR (so ``max()`` of findings' severities is the worst).

    A string enum would otherwise compare as strings ("warning" > "error"); the order is the rank's.
    """

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return _RANK[self.value]

    def at_least(self, level: Severity) -> bool:
        return self.rank >= level.rank

    def __lt__(self, other: object) -> bool:
        return self.rank < Severity(other).rank if isinstance(other, str) else NotImplemented

    def __le__(self, other: object) -> bool:
        return self.rank <= Severity(other).rank if isinstance(other, str) else NotImplemented

    def __gt__(self, other: object) -> bool:
        return self.rank > Severity(other).rank if isinstance(other, str) else NotImplemented

    def __ge__(self, other: object) -> bool:
        return self.rank >= Severity(other).rank if isinstance(other, str) else NotImplemented


_RANK = {"info": 0, "warning": 1, "error": 2}


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One rule's verdict on one layer (or on the whole file when ``layer`` is None)."""

    code: str
    severity: Severity
    message: str
    hint: str
    layer: str | None = None
    source: str | None = None
    tensor: str | None = None
    channels: tuple[int, ...] = ()
    channel_count: int = 0


@dataclass(frozen=True)
class ChannelValues:
    """A statistic's value in every channel, NaN and inf included, for the formats that draw them (the HTML report).

    Kept only when asked for (``Options.channel_values``) and never written to JSON. Packed as float64 in native
    byte order: 8 bytes a channel rather than a Python float's 32, so the statistics of 400 layers of 1024 channels
    cost 3.3 MB each, and a worker process returns them as one bytes object.
    """

    packed: bytes

    def __len__(self) -> int:
        return len(self.packed) // 8

    def tolist(self) -> list[float]:
        return array.array("d", self.packed).tolist()


@dataclass(frozen=True, kw_only=True)
class Summary:
    """min / max / mean over the finite values of a statistic; None when it has no finite value."""

    min: float | None
    max: float | None
    mean: float | None
    nonfinite: int = 0


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One configuration value of a BatchNorm layer and where it was read ("pickled module", "traced batch_norm
    call", "config.json batch_norm_momentum"...). ``value`` None is a recorded None (``momentum=None``: a cumulative
    average), not an unknown value: an unknown setting is no Setting at all."""

    value: float | bool | None
    source: str


@dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """A layer's configuration as far as the file records it; None where the file does not say (a state dict
    carries none of it)."""

    momentum: Setting | None = None
    eps: Setting | None = None
    training: Setting | None = None
    track_running_stats: Setting | None = None
    affine: Setting | None = None

    @property
    def known(self) -> bool:
        return any(getattr(self, name) is not None for name in CONFIG_FIELDS)


CONFIG_FIELDS = ("momentum", "eps", "training", "track_running_stats", "affine")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """BatchNorm settings that a model's configuration file (a Hugging Face ``config.json``) gives for the model as a
    whole. They are not attributed to layers: the code that builds the model decides which layers use them
    (transformers' EfficientNet passes ``batch_norm_momentum`` to most of its BatchNorm layers, not all)."""

    file: str
    # dotted key path of the object holding the settings in the file; "" for the top level
    path: str
    model_type: str | None
    settings: LayerConfig


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    name: str
    source: str
    averaged: bool
    kind: str
    kind_inferred: bool
    num_features: int | None
    dtype: str | None
    num_batches_tracked: int | None
    running_mean: Summary | None
    running_var: Summary | None
    codes: tuple[str, ...] = ()
    configuration: LayerConfig = LayerConfig()
    # the stored statistics channel by channel, when asked for; None when absent or not floating
    mean_by_channel: ChannelValues | None = None
    var_by_channel: ChannelValues | None = None


@dataclass(frozen=True, kw_only=True)
class LayerDriftInfo:
    """One layer's drift between its stored and its recomputed statistics."""

    name: str
    source: str
    module: str
    samples: int
    mean_shift_median: float
    mean_shift_worst: float
    log_var_ratio_median: float
    log_var_ratio_worst: float
    stale: bool
    silenced: bool
    # what the layer received, channel by channel, when asked for (the stored values are the LayerInfo's)
    recomputed_mean: ChannelValues | None = None
    recomputed_var: ChannelValues | None = None


@dataclass(frozen=True, kw_only=True)
class UnmeasuredLayer:
    """A BatchNorm layer of the model that recomputation could not measure: its statistics are left alone."""

    name: str
    module: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RecomputeInfo:
    """How the statistics were recomputed, and the drift of every layer the model ran through."""

    model: str
    data: str
    mode: str
    estimator: str
    variance_convention: str
    source: str
    prefix: str
    samples: int
    batches: int
    batches_skipped: int
    too_few_samples: bool
    layers: tuple[LayerDriftInfo, ...]
    unmeasured: tuple[UnmeasuredLayer, ...] = ()
    # how the data was fed to the model (inputs chosen from each batch, a dtype cast, small batches)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FileError:
    code: str
    message: str


@dataclass(frozen=True, kw_only=True)
class FileReport:
    path: str
    format: str | None
    size_bytes: int | None
    layers: tuple[LayerInfo, ...] = ()
    findings: tuple[Finding, ...] = ()
    error: FileError | None = None
    notes: tuple[str, ...] = ()
    recompute: RecomputeInfo | None = None
    # recomputation failed for this file (the model does not fit it, ...): its static findings still stand
    recompute_error: FileError | None = None
    # BatchNorm settings from a configuration file beside the checkpoint (config.json)
    model_configs: tuple[ModelConfig, ...] = ()

    @property
    def errors(self) -> tuple[FileError, ...]:
        """What kept a check from running: the file could not be read, or recomputation failed for it."""
        return tuple(error for error in (self.error, self.recompute_error) if error is not None)

    @property
    def checked(self) -> bool:
        """Whether every check asked for ran: the file was read, and recomputation (if asked for) did not fail."""
        return self.error is None and self.recompute_error is None

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity is severity)

    def fails(self, fail_on: Severity) -> bool:
        return any(f.severity.at_least(fail_on) for f in self.findings)


@dataclass(frozen=True, kw_only=True)
class LayerDiff:
    """One layer present in both checkpoints: how far B's statistics are from A's."""

    name_a: str
    name_b: str
    channels: int
    mean_shift_median: float
    mean_shift_worst: float
    log_var_ratio_median: float
    log_var_ratio_worst: float
    drifted: bool
    reasons: tuple[str, ...] = ()
    # both sides channel by channel, when asked for and only for a drifted layer
    mean_a: ChannelValues | None = None
    var_a: ChannelValues | None = None
    mean_b: ChannelValues | None = None
    var_b: ChannelValues | None = None


@dataclass(frozen=True, kw_only=True)
class FoldedLayer:
    """A layer of A that B has no BatchNorm for because the export folded it into the layer feeding it: a tensor of
    B equals that layer's weight scaled by the layer's statistics (``weight * gamma / sqrt(var + eps)``), within B's
    rounding. ``bias_b`` names B's tensor equal to the folded bias (``beta + (bias - mean) * scale``), or is None
    when none is: the running_mean or the affine bias that B folded in is not A's."""

    name_a: str
    feeder_a: str  # the layer of A whose output this layer normalised ("features.0")
    weight_b: str
    bias_b: str | None

    @property
    def faithful(self) -> bool:
        return self.bias_b is not None


@dataclass(frozen=True, kw_only=True)
class DiffReport:
    """Layer-by-layer comparison of the BatchNorm statistics of two checkpoints."""

    path_a: str
    path_b: str
    source_a: str = ""
    source_b: str = ""
    format_a: str | None = None
    format_b: str | None = None
    error: FileError | None = None
    only_in_a: tuple[str, ...] = ()
    only_in_b: tuple[str, ...] = ()
    channel_changes: tuple[tuple[str, int | None, int | None], ...] = ()
    layers: tuple[LayerDiff, ...] = ()
    # layers of A whose statistics B holds folded into the layer before them (not in only_in_a)
    folded: tuple[FoldedLayer, ...] = ()
    notes: tuple[str, ...] = ()  # what the comparison could not do (not differences)
    tool_version: str = ""

    @property
    def differs(self) -> bool:
        return bool(
            self.only_in_a
            or self.only_in_b
            or self.channel_changes
            or any(d.drifted for d in self.layers)
            or not all(f.faithful for f in self.folded)
        )


@dataclass(frozen=True, kw_only=True)
class RuleInfo:
    """A rule's description, carried in the report so that formats such as SARIF can describe every rule."""

    code: str
    name: str
    severity: Severity
    summary: str
    doc: str

    @property
    def paragraphs(self) -> tuple[str, ...]:
        """The doc text re-flowed: one string per paragraph (What, Why, Fix)."""
        return tuple(" ".join(block.split()) for block in self.doc.split("\n\n") if block.strip())


@dataclass(frozen=True, kw_only=True)
class ConfigInfo:
    """The settings file a run read, and what the report must say about it."""

    path: str
    # found by the upward search from the working directory, rather than passed with --config
    discovered: bool
    # every key it set, with its value as written
    settings: tuple[tuple[str, str], ...] = ()
    # what a discovered file changed
    notes: tuple[str, ...] = ()
    # what a discovered file tried to do and could not: drop a security code (BN1xx)
    overruled: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Report:
    files: tuple[FileReport, ...]
    fail_on: Severity = Severity.ERROR
    tool_version: str = ""
    rules: tuple[RuleInfo, ...] = ()
    config: ConfigInfo | None = None

    @property
    def unreadable(self) -> bool:
        """At least one path could not be checked."""
        return any(not f.checked for f in self.files)

    @property
    def failed(self) -> bool:
        """At least one finding at or above the fail level."""
        return any(f.fails(self.fail_on) for f in self.files)

    @property
    def ok(self) -> bool:
        return not (self.unreadable or self.failed)

    def count(self, severity: Severity) -> int:
        return sum(f.count(severity) for f in self.files)

    @property
    def layer_count(self) -> int:
        return sum(len(f.layers) for f in self.files)
