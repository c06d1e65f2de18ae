"""Score a model on labelled data with its stored and with its recomputed statistics. Needs torch, imported lazily.

Recalibration helps weights that were trained under batch statistics and harms a fine-tune whose BatchNorm was
frozen on purpose; the drift itself cannot tell the two apart, only labelled data can. VDATA follows DATA's
conventions (``bncheck.model_data``) with one element more per batch, the target:

- a tensor file with named tensors: the target is the tensor named by ``target``, or else the one tensor named
  ``labels``, ``label``, ``targets``, ``target`` or ``y``; the rest are the inputs, one tensor being the one input;
- a ``module:callable`` / ``file.py:callable`` returning batches: a tuple's target is its last element (or the index
  ``target``), a dict's the key ``target`` or one of the names above; the rest are the inputs, as for DATA.

Integer (or boolean) targets are class labels scored by accuracy (argmax over axis 1 of the output), floating
targets by mean squared error; a metric callable gets every output and every target, concatenated along the
sample axis, and returns one number. Evaluation runs in ``eval()`` under ``torch.inference_mode()`` and leaves the
model as it found it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bncheck.errors import DataError, ModelError, WriteError, first_line
from bncheck.model_data import SampleData, load_callable, model_batches
from bncheck.recompute import DEFAULT_MAX_SAMPLES, Batch, PreservedModel, batch_size_of, floating_dtype, moved_inputs

if TYPE_CHECKING:
    import torch

# The names a target tensor or key is found under when none is given, in this order of preference.
TARGET_NAMES = ("labels", "label", "targets", "target", "y")
BUILTIN_METRICS = ("accuracy", "mse")
MetricMode = Literal["max", "min"]


@dataclass(frozen=True, kw_only=True)
class ValidationRequest:
    """Labelled data to score the model on, before and after recalibration, and how to score it.

    ``data`` is a tensor file or a ``module:callable`` / ``file.py:callable`` (see the module docstring).
    ``target`` names the target tensor, key or tuple index; None: found as the module docstring says.
    ``metric`` is ``accuracy``, ``mse``, or a ``module:fn`` / ``file.py:fn`` taking ``(outputs, targets)`` and
    returning a number (every batch's outputs concatenated along the sample axis; a list of them when the model
    returns something other than a tensor); None: accuracy for integer targets, mse for floating ones. ``mode``
    says whether a metric callable's higher (``max``, its default) or lower (``min``) values are better; the
    built-in metrics know theirs.
    ``inputs`` chooses the model's inputs from each batch as ``--inputs`` does (None: the recompute request's).
    ``max_samples`` None: the recompute request's budget.
    """

    data: str
    target: str | None = None
    metric: str | None = None
    mode: MetricMode | None = None
    inputs: tuple[str, ...] | None = None
    max_samples: int | None = None


@dataclass(frozen=True, kw_only=True)
class Validation:
    """The metric with the checkpoint's stored statistics and with the recomputed ones, on the same batches."""

    metric: str
    higher_is_better: bool
    samples: int
    stored: float
    recalibrated: float

    @property
    def change(self) -> float:
        return self.recalibrated - self.stored

    @property
    def worse(self) -> bool:
        """Whether recalibration scores strictly worse (a NaN score is worse than any number)."""
        if math.isnan(self.recalibrated):
            return not math.isnan(self.stored)
        if math.isnan(self.stored):
            return False
        return self.recalibrated < self.stored if self.higher_is_better else self.recalibrated > self.stored

    def summary(self) -> str:
        """One line: ``validation accuracy on 488 samples: stored 0.963, recalibrated 0.951 (-0.012)``."""
        form = ".3f" if self.metric == "accuracy" else ".4g"
        direction = "" if self.metric == "accuracy" else f", {'higher' if self.higher_is_better else 'lower'} is better"
        return (
            f"validation {self.metric} on {self.samples} samples: stored {self.stored:{form}}, "
            f"recalibrated {self.recalibrated:{form}} ({self.change:+{form}}{direction})"
        )


@dataclass
class _Metric:
    """Accumulates one pass of (outputs, targets) batches into a score."""

    name: str  # accuracy, mse or the callable's spec
    function: Any = None
    mode: MetricMode = "max"
    total: float = 0.0
    count: int = 0
    outputs: list[Any] = dataclasses.field(default_factory=list)
    targets: list[Any] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return "mean squared error" if self.name == "mse" else self.name

    @property
    def higher_is_better(self) -> bool:
        return {"accuracy": True, "mse": False}.get(self.name, self.mode == "max")

    def add(self, outputs: Any, targets: torch.Tensor) -> None:
        import torch

        if self.function is not None:
            self.outputs.append(outputs.detach().cpu() if isinstance(outputs, torch.Tensor) else outputs)
            self.targets.append(targets.detach().cpu())
            return
        if not isinstance(outputs, torch.Tensor):
            raise DataError(
                f"the model returns {type(outputs).__name__}, not a tensor: {self.label} needs one output tensor; "
                "give a metric callable (--metric file.py:fn)"
            )
        n = int(targets.shape[0])
        if self.name == "accuracy":
            if outputs.dim() < 2 or outputs.shape[0] != n or outputs.shape[2:] != targets.shape[1:]:
                raise DataError(
                    f"the model's outputs of shape {tuple(outputs.shape)} do not fit class labels of shape "
                    f"{tuple(targets.shape)}: accuracy needs one score per class on axis 1; give --metric"
                )
            classes = int(outputs.shape[1])
            labels = targets.to(torch.int64)
            outside = labels[(labels < 0) | (labels >= classes)]
            if outside.numel():
                raise DataError(f"label {int(outside[0])} is outside the model's {classes} output classes")
            self.total += float((outputs.argmax(dim=1) == labels).sum())
            self.count += labels.numel()
            return
        if outputs.shape[0] != n or outputs.numel() != targets.numel():
            raise DataError(
                f"the model's outputs of shape {tuple(outputs.shape)} do not fit targets of shape "
                f"{tuple(targets.shape)}: mean squared error needs one output per target; give --metric"
            )
        difference = outputs.reshape(targets.shape).to(torch.float64) - targets.to(torch.float64)
        self.total += float((difference**2).sum())
        self.count += targets.numel()

    def score(self) -> float:
        import torch

        if self.function is None:
            return self.total / self.count if self.count else math.nan
        try:
            outputs = torch.cat(self.outputs) if all(isinstance(o, torch.Tensor) for o in self.outputs) else None
            value = self.function(self.outputs if outputs is None else outputs, torch.cat(self.targets))
        except Exception as exc:  # the user's metric failed
            raise DataError(f"metric {self.name} raised {first_line(exc)}") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(f"metric {self.name} returned {type(value).__name__}, not a number")
        return float(value)


def check_validation(validate: ValidationRequest, *, batch_size: int) -> None:
    """Raise DataError now for VDATA or a metric that cannot be used, before any model runs."""
    if validate.metric is not None and validate.metric not in BUILTIN_METRICS:
        if not callable(load_callable(validate.metric, error=DataError)):
            raise DataError(f"metric {validate.metric} is not callable")
    elif validate.mode is not None:
        raise DataError("--metric-mode applies to a metric callable (accuracy is higher-better, mse lower-better)")
    try:
        SampleData(spec=validate.data, batch_size=batch_size).check()
    except DataError as exc:
        raise DataError(f"validation data: {exc}") from None


def validate_statistics(
    model: torch.nn.Module,
    validate: ValidationRequest,
    recomputed: Mapping[str, Mapping[str, Any]],
    *,
    batch_size: int = 64,
    inputs: tuple[str, ...] = (),
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    device: str = "cpu",
) -> Validation:
    """Score ``model`` in eval mode on the labelled data twice: as it is (the stored statistics), then with the
    BatchNorm buffers in ``recomputed`` (module name -> buffer name -> array or tensor) written over its own.
    The model is left as it was found, buffers and training flags."""
    from bncheck.recompute import batchnorm_modules

    modules = batchnorm_modules(model)
    custom = validate.metric is not None and validate.metric not in BUILTIN_METRICS
    # the user's metric module is imported once, not once per pass
    function = load_callable(validate.metric, error=DataError) if custom and validate.metric else None
    preserved = PreservedModel(model, modules)
    try:
        stored, samples = _score(model, validate, function, batch_size, inputs, max_samples, device)
        _assign(modules, recomputed)
        recalibrated, _ = _score(model, validate, function, batch_size, inputs, max_samples, device)
    finally:
        preserved.restore()
    return Validation(
        metric=stored.label,
        higher_is_better=stored.higher_is_better,
        samples=samples,
        stored=stored.score(),
        recalibrated=recalibrated.score(),
    )


def _assign(modules: Mapping[str, torch.nn.Module], recomputed: Mapping[str, Mapping[str, Any]]) -> None:
    import torch

    with torch.no_grad():
        for name, values in recomputed.items():
            buffers = dict(modules[name].named_buffers(recurse=False))
            for buffer_name, array in values.items():
                buffer = buffers[buffer_name]
                buffer.copy_(torch.as_tensor(array).reshape(buffer.shape).to(buffer.dtype))


def _metric(validate: ValidationRequest, function: Any, targets: torch.Tensor) -> _Metric:
    if validate.metric is None:
        return _Metric("mse" if targets.is_floating_point() else "accuracy")
    if function is None:
        return _Metric(validate.metric)
    return _Metric(validate.metric, function, validate.mode or "max")


def _score(
    model: torch.nn.Module,
    validate: ValidationRequest,
    function: Any,
    batch_size: int,
    inputs: tuple[str, ...],
    max_samples: int | None,
    device: str,
) -> tuple[_Metric, int]:
    """One eval-mode pass: the metric holding what it needs to score, and the number of samples."""
    import torch

    dtype, casts = floating_dtype(model), set[str]()
    metric: _Metric | None = None
    samples = 0
    model.eval()
    with torch.inference_mode():
        for batch, targets in labelled_batches(
            model, validate, batch_size=batch_size, inputs=inputs, max_samples=max_samples
        ):
            args, kwargs = moved_inputs(batch, device, dtype, casts)
            try:
                outputs = model(*args, **kwargs)
            except Exception as exc:  # the model's own code failed on this data
                message = f"the model failed on the validation data: {first_line(exc)}"
                if isinstance(exc, TypeError | AttributeError):  # batches shaped unlike the model's inputs
                    message += "; choose the model's inputs of each batch with --inputs (e.g. 0 or image)"
                raise ModelError(message) from exc
            if metric is None:
                metric = _metric(validate, function, targets)
            metric.add(outputs, targets.to(device))
            samples += int(targets.shape[0])
    if metric is None or samples == 0:
        raise DataError(f"validation data: {validate.data} holds no samples")
    return metric, samples


def labelled_batches(
    model: torch.nn.Module,
    validate: ValidationRequest,
    *,
    batch_size: int = 64,
    inputs: tuple[str, ...] = (),
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """The model's inputs and the targets of each batch of VDATA, at most ``max_samples`` samples.

    The inputs are chosen by ``model_batches``, exactly as for DATA; the target is split off each raw batch first.
    """
    chosen = validate.inputs if validate.inputs is not None else inputs
    budget = validate.max_samples if validate.max_samples is not None else max_samples
    data = _Labelled(
        spec=validate.data, batch_size=batch_size, max_samples=budget, inputs=chosen, target=validate.target
    )
    try:
        for batch in model_batches(data, model, []):
            targets = data.pending.popleft()
            yield batch, targets[: batch_size_of(batch)]
    except DataError as exc:
        raise DataError(f"validation data: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class _Labelled(SampleData):
    """VDATA read as DATA is, each raw batch's target set aside (in ``pending``) before ``model_batches`` sees it."""

    target: str | None = None
    pending: deque[Any] = dataclasses.field(default_factory=deque, compare=False)

    def items(self) -> Iterator[Any]:
        from_file = Path(self.spec).is_file()
        for item in super().items():
            rest, targets = _split(item, self.target, self.spec, from_file=from_file, keep_whole=bool(self.inputs))
            self.pending.append(targets)
            yield rest


def _split(item: Any, target: str | None, spec: str, *, from_file: bool, keep_whole: bool) -> tuple[Any, Any]:
    """(the inputs, the targets) of one raw batch. With ``keep_whole`` (``--inputs`` given) the inputs are the batch
    as it is, so the indexes and keys the user gave keep their meaning."""
    import torch

    if isinstance(item, Mapping):
        key = target if target is not None else next((name for name in TARGET_NAMES if name in item), None)
        if key is None or key not in item:
            wanted = repr(target) if target is not None else "named " + ", ".join(TARGET_NAMES)
            raise DataError(
                f"{spec} has no target {wanted} (it has {', '.join(map(str, item))}); name it with --validate-target"
            )
        rest: Any = {name: value for name, value in item.items() if name != key}
        if not rest:
            raise DataError(f"{spec} holds only the target {key!r}: validation needs inputs too")
        if from_file and len(rest) == 1:  # one tensor of a file is the one input, whatever its name (as for DATA)
            rest = next(iter(rest.values()))
        labels = item[key]
    elif isinstance(item, tuple | list):
        if len(item) < 2:
            raise DataError(f"{spec} yields batches of {len(item)} element(s): validation needs (inputs, targets)")
        try:
            index = int(target) if target is not None else len(item) - 1
            labels = item[index]
        except (ValueError, IndexError):
            raise DataError(
                f"--validate-target {target!r}: the batches of {spec} have indexes 0..{len(item) - 1}"
            ) from None
        index %= len(item)
        rest = type(item)(value for position, value in enumerate(item) if position != index)
    elif isinstance(item, torch.Tensor):
        raise DataError(f"{spec} holds inputs only: validation needs targets too (e.g. an .npz with x and labels)")
    else:
        raise DataError(f"{spec} yielded {type(item).__name__}: expected a tuple or dict of inputs and targets")
    labels = torch.as_tensor(labels)
    if labels.dim() == 0:
        raise DataError(f"the targets of {spec} need a sample axis (their first dimension); got a scalar")
    given = batch_size_of(Batch((rest,)))
    if given != labels.shape[0]:
        raise DataError(f"a batch of {spec} holds {given} inputs but {int(labels.shape[0])} targets")
    return (item if keep_whole else rest), labels


def check_not_worse(validation: Validation, *, allow_worse: bool) -> None:
    """Raise WriteError, naming both scores, when recalibration scores worse and that was not allowed.

    (A class of its own would belong in ``errors.py``; until then the refusal is a WriteError whose message holds
    the numbers, and ``recalibrate_validated(..., allow_worse=True)`` returns them as a ``Validation``.)
    """
    if validation.worse and not allow_worse:
        raise WriteError(
            f"recalibration makes the model worse, so nothing was written: {validation.summary()}; "
            "pass --allow-worse to write it anyway"
        )


__all__ = [
    "Validation",
    "ValidationRequest",
    "check_not_worse",
    "check_validation",
    "labelled_batches",
    "validate_statistics",
]
