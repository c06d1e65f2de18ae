"""Recompute BatchNorm statistics by running a model over sample data. Needs torch, imported lazily.

Train mode re-estimates the statistics the way training sees them: only the BatchNorm layers train (dropout and
the rest stay in eval), each normalises with its batch statistics, and each layer's input is accumulated per
channel in float64 with an exact streaming merge (Chan et al.), so the result does not depend on how samples are
split into batches. Eval mode measures what each layer receives at inference, with every layer normalising by the
stored statistics. Either way the model is left exactly as it was found.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bncheck.checks import LayerDrift, Thresholds
from bncheck.discover import StateDict, find_state_dicts
from bncheck.drift import measure_drift
from bncheck.errors import ModelError, first_line
from bncheck.moments import TAIL_SAMPLES, Moments, channel_moments, reduced_dims, tail_moments
from bncheck.read import LayerData
from bncheck.report import LayerDriftInfo, RecomputeInfo

if TYPE_CHECKING:
    import torch

Mode = Literal["train", "eval"]
Estimator = Literal["exact", "pytorch"]

VARIANCE_CONVENTIONS = {
    "exact": "unbiased variance pooled over every value of every sample (exact, independent of batching)",
    "pytorch": "mean of per-batch unbiased variances, as torch.optim.swa_utils.update_bn computes",
}


@dataclass(frozen=True, kw_only=True)
class RecomputeRequest:
    """What to run to recompute the statistics: a model spec, a data spec and how to batch them."""

    model: str
    data: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    max_samples: int | None = None
    mode: Mode = "train"
    estimator: Estimator = "exact"
    device: str = "cpu"
    # the checkpoint entry to load into the model (e.g. state_dict_ema); None: the one that fits
    source: str | None = None
    # fnmatch patterns of layer names whose BN012 is silenced
    silence_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Batch:
    """One batch of model inputs: positional and keyword arguments of ``model(...)``."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Call:
    """What one forward pass measured at one BatchNorm module (both calls merged when it runs twice)."""

    samples: int
    moments: Moments  # count, mean, M2 of every value the layer normalised
    tail: Moments  # M2..M4 of a subsample, for the kurtosis

    def merge(self, other: _Call) -> None:
        self.moments.merge(other.moments)
        self.tail.merge(other.tail)


@dataclass
class _LayerAccumulator:
    pooled: Moments = field(default_factory=Moments)
    tail: Moments = field(default_factory=Moments)
    batch_mean_sum: np.ndarray | None = None
    batch_var_sum: np.ndarray | None = None
    batches: int = 0
    samples: int = 0

    def add(self, call: _Call) -> None:
        self.pooled.merge(call.moments)
        self.tail.merge(call.tail)
        assert call.moments.mean is not None
        self.add_batch(call.samples, call.moments.mean, call.moments.variance())

    def add_batch(self, samples: int, mean: np.ndarray, var: np.ndarray) -> None:
        """One batch's mean and unbiased variance, for the per-batch average (all a TorchScript model gives)."""
        self.batch_mean_sum = mean if self.batch_mean_sum is None else self.batch_mean_sum + mean
        self.batch_var_sum = var if self.batch_var_sum is None else self.batch_var_sum + var
        self.batches += 1
        self.samples += samples


@dataclass(frozen=True)
class LayerStatistics:
    """Recomputed statistics of one BatchNorm module (float64), under both variance conventions."""

    module: str
    mean_pooled: np.ndarray
    var_pooled: np.ndarray
    mean_batch_average: np.ndarray
    var_batch_average: np.ndarray
    samples: int
    values_per_channel: int
    batches: int
    # per-channel kurtosis of the layer's input (3 for Gaussian data), for the noise floor of the variance;
    # None when only per-batch statistics exist (TorchScript)
    kurtosis: np.ndarray | None = None

    def for_estimator(self, estimator: Estimator) -> tuple[np.ndarray, np.ndarray]:
        if estimator == "pytorch":
            return self.mean_batch_average, self.var_batch_average
        return self.mean_pooled, self.var_pooled


@dataclass(frozen=True)
class RecomputeResult:
    layers: dict[str, LayerStatistics]
    batches_used: int
    batches_skipped: int
    samples: int
    mode: Mode
    # False for TorchScript models, whose layers cannot be hooked: only per-batch statistics exist
    pooled: bool = True


class _SkipBatch(Exception):
    """A BatchNorm in train mode got one value per channel; torch would raise, so the batch is skipped."""


class _StopForward(Exception):
    """Every BatchNorm of the model has seen this batch: the rest of the forward pass is not needed."""


_SCRIPTED_BATCHNORM = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})


def batchnorm_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The BatchNorm modules (1d/2d/3d, SyncBatchNorm, lazy, scripted) that keep running statistics, by name."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, _BatchNorm) or getattr(module, "original_name", None) in _SCRIPTED_BATCHNORM)
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    }


class _Preserved:
    """Every module's training flag and every BatchNorm buffer, restored on exit."""

    def __init__(self, model: torch.nn.Module, modules: Mapping[str, torch.nn.Module]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.buffers = [
            (buffer, buffer.detach().clone())
            for module in modules.values()
            for name, buffer in module.named_buffers(recurse=False)
            if name in ("running_mean", "running_var", "num_batches_tracked")
        ]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        for module, flag in self.flags:
            module.training = flag


def _plain_batchnorm(module: torch.nn.Module) -> bool:
    """Whether the module runs _BatchNorm's own forward (BatchNorm1d/2d/3d, lazy ones), so that a forward doing
    the same normalisation may stand in for it; SyncBatchNorm and subclasses with a forward of their own keep it."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return type(module).forward is _BatchNorm.forward and "forward" not in vars(module)


class _BatchStatisticsForward:
    """Replaces a BatchNorm's train-mode forward until ``remove()`` (listed with the hook handles, which are
    removed the same way). The stand-in computes each channel's batch mean and biased variance once, records them,
    and normalises with them through ``F.batch_norm(training=False)``: the train-mode output, without the
    layer's own second pass over the statistics and without touching its running statistics. The two-pass
    reduction runs in the input's dtype (float32: about 1e-7 relative to float64, within 1e-6 by
    bench/recompute_speed.py); other dtypes keep the layer's own forward and are measured in float64."""

    def __init__(self, module: Any, measured: dict[str, Moments], name: str) -> None:
        # Any: the BatchNorm attributes (eps, weight, _check_input_dim) are not on torch.nn.Module's type
        import torch
        import torch.nn.functional as F
        from torch.nn.modules.batchnorm import _BatchNorm

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in (torch.float32, torch.float64):
                measured[name] = channel_moments(x)
                return _BatchNorm.forward(module, x)
            module._check_input_dim(x)
            dims = reduced_dims(x)
            count = x.numel() // x.shape[1]
            mean = x.mean(dim=dims, keepdim=True)
            var = (x - mean).square_().mean(dim=dims)
            mean = mean.flatten()
            moments = Moments(count, mean.double().cpu().numpy(), var.double().cpu().numpy() * count)
            measured[name] = moments
            return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)

        self.module = module
        module.forward = forward

    def remove(self) -> None:
        del self.module.forward


def recompute_statistics(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    mode: Mode = "train",
    device: str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> RecomputeResult:
    """Run ``model`` over ``batches`` and measure every BatchNorm layer's input, per channel.

    ``on_batch`` is called with the number of samples of each batch processed (for a progress bar).
    """
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        return _recompute_scripted(model, batches, mode=mode, device=device, on_batch=on_batch)
    modules = batchnorm_modules(model)
    accumulators = {name: _LayerAccumulator() for name in modules}
    pending: dict[str, _Call] = {}
    expected_calls: dict[str, int] | None = None  # learnt on the first batch
    calls: dict[str, int] = {}
    measured: dict[str, Moments] = {}  # this call's moments, from the pre-hook or the replaced forward
    tails: dict[str, Moments] = {}
    replaced = {name for name, module in modules.items() if mode == "train" and _plain_batchnorm(module)}

    def record(name: str, call: _Call) -> None:
        if name in pending:  # a module called twice in one pass: merge both calls
            pending[name].merge(call)
        else:
            pending[name] = call

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            if mode == "train" and x.numel() == x.shape[1]:
                raise _SkipBatch
            if accumulators[name].samples < TAIL_SAMPLES:
                tails[name] = tail_moments(x)
            if name not in replaced:
                measured[name] = channel_moments(x)

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            record(name, _Call(int(inputs[0].shape[0]), measured.pop(name), tails.pop(name, Moments())))
            calls[name] = calls.get(name, 0) + 1
            if expected_calls is not None and all(calls.get(n, 0) >= c for n, c in expected_calls.items()):
                raise _StopForward

        return hook

    preserved = _Preserved(model, modules)
    handles: list[Any] = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
        if name in replaced:
            handles.append(_BatchStatisticsForward(module, measured, name))
    used = skipped = samples = 0
    try:
        model.eval()
        if mode == "train":
            for module in modules.values():
                module.train()
        with torch.inference_mode():
            for batch in batches:
                pending.clear()
                calls.clear()
                args = tuple(_to_device(a, device) for a in batch.args)
                kwargs = {k: _to_device(v, device) for k, v in batch.kwargs.items()}
                try:
                    model(*args, **kwargs)
                except _SkipBatch:
                    skipped += 1
                    continue
                except _StopForward:
                    pass
                except Exception as exc:  # the model's own code failed on this data
                    raise _model_failed(exc) from exc
                if expected_calls is None:
                    expected_calls = dict(calls)
                for name, call in pending.items():
                    accumulators[name].add(call)
                used += 1
                batch_size = _batch_size(args, kwargs)
                samples += batch_size
                if on_batch is not None:
                    on_batch(batch_size)
    finally:
        for handle in handles:
            handle.remove()
        preserved.restore()
    return RecomputeResult(
        layers={name: _finish(name, acc) for name, acc in accumulators.items() if acc.batches},
        batches_used=used,
        batches_skipped=skipped,
        samples=samples,
        mode=mode,
    )


def _recompute_scripted(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    mode: Mode,
    device: str,
    on_batch: Callable[[int], None] | None,
) -> RecomputeResult:
    """TorchScript runs no Python hooks, so the layers' own update is used: with the stored statistics zeroed
    before each batch, one train-mode step leaves ``momentum * batch statistic`` in the buffers. Only per-batch
    statistics are available this way, so the result is the per-batch average (update_bn's convention)."""
    import torch

    if mode != "train":
        raise ModelError("eval mode needs each layer's input, which a TorchScript model does not expose")
    modules = batchnorm_modules(model)
    accumulators = {name: _LayerAccumulator() for name in modules}
    used = skipped = samples = 0
    preserved = _Preserved(model, modules)
    try:
        model.eval()
        for module in modules.values():
            module.train()
        with torch.no_grad():
            for batch in batches:
                for module in modules.values():
                    for name, buffer in module.named_buffers(recurse=False):
                        if name in ("running_mean", "running_var", "num_batches_tracked"):
                            buffer.zero_()
                args = tuple(_to_device(a, device) for a in batch.args)
                kwargs = {k: _to_device(v, device) for k, v in batch.kwargs.items()}
                try:
                    model(*args, **kwargs)
                except Exception as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise _model_failed(exc) from exc
                    skipped += 1
                    continue
                size = _batch_size(args, kwargs)
                for name, module in modules.items():
                    buffers = dict(module.named_buffers(recurse=False))
                    if int(buffers["num_batches_tracked"]) == 0:
                        continue  # not reached by this batch
                    momentum = getattr(module, "momentum", None)
                    factor = 1.0 if momentum is None else float(momentum)
                    mean = buffers["running_mean"].double().cpu().numpy() / factor
                    var = buffers["running_var"].double().cpu().numpy() / factor
                    accumulators[name].add_batch(size, mean, var)
                used += 1
                samples += size
                if on_batch is not None:
                    on_batch(size)
    finally:
        preserved.restore()
    layers = {}
    for name, acc in accumulators.items():
        if acc.batches and acc.batch_mean_sum is not None and acc.batch_var_sum is not None:
            mean, var = acc.batch_mean_sum / acc.batches, acc.batch_var_sum / acc.batches
            layers[name] = LayerStatistics(name, mean, var, mean, var, acc.samples, 0, acc.batches)
    return RecomputeResult(layers, used, skipped, samples, mode, pooled=False)


def _finish(name: str, acc: _LayerAccumulator) -> LayerStatistics:
    pooled = acc.pooled
    assert pooled.mean is not None and pooled.m2 is not None
    assert acc.batch_mean_sum is not None and acc.batch_var_sum is not None
    var_pooled = pooled.variance()
    return LayerStatistics(
        module=name,
        mean_pooled=pooled.mean,
        var_pooled=var_pooled,
        mean_batch_average=acc.batch_mean_sum / acc.batches,
        var_batch_average=acc.batch_var_sum / acc.batches,
        samples=acc.samples,
        values_per_channel=pooled.count,
        batches=acc.batches,
        kurtosis=acc.tail.kurtosis(),
    )


def _to_device(value: Any, device: str) -> Any:
    import torch

    return value.to(device) if isinstance(value, torch.Tensor) else value


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _model_failed(exc: Exception) -> ModelError:
    return ModelError(f"the model failed on the sample data: {first_line(exc)}")


@dataclass
class Workload:
    """The model and batches of a RecomputeRequest, built once and shared by every checkpoint."""

    request: RecomputeRequest
    model: Any
    batches: list[Batch]
    progress: Callable[[int], None] | None = None


def prepare(request: RecomputeRequest, progress: Callable[[int], None] | None = None) -> Workload:
    """Build the model and load the batches; a spec that cannot be loaded raises ModelError / DataError."""
    from bncheck.model_data import load_batches, load_model

    batches = load_batches(request.data, batch_size=request.batch_size, max_samples=request.max_samples)
    model = load_model(request.model, kwargs=request.model_kwargs)
    try:
        model = model.to(request.device)
    except (RuntimeError, AssertionError, ValueError) as exc:  # no such device, or torch built without it
        raise ModelError(f"cannot use device {request.device!r}: {first_line(exc)}") from exc
    return Workload(request, model, batches, progress)


def run_model(root: Any, workload: Workload, mode: Mode) -> tuple[StateDict, str, RecomputeResult]:
    """Load the checkpoint's state dict that fits the model into it, then rerun the model on the sample data."""
    from bncheck.model_data import load_state_into

    request = workload.request
    state, prefix = load_state_into(workload.model, find_state_dicts(root), source=request.source)
    result = recompute_statistics(
        workload.model, workload.batches, mode=mode, device=request.device, on_batch=workload.progress
    )
    return state, prefix, result


def measure_checkpoint(
    root: Any, layers: Sequence[LayerData], workload: Workload, thresholds: Thresholds
) -> tuple[list[LayerDrift], RecomputeInfo]:
    """Load the checkpoint into the model, rerun it on the sample data, and measure each layer's drift."""
    request = workload.request
    state, prefix, result = run_model(root, workload, request.mode)
    by_name = {(data.layer.source, data.layer.name): data for data in layers}
    drifts: list[LayerDrift] = []
    rows: list[LayerDriftInfo] = []
    for module, stats in result.layers.items():
        data = by_name.get((state.source, prefix + module))
        stored_mean, stored_var = (data.floats("running_mean"), data.floats("running_var")) if data else (None, None)
        if data is None or stored_mean is None or stored_var is None or stored_mean.shape != stats.mean_pooled.shape:
            continue  # missing or malformed statistics are reported by the static rules
        new_mean, new_var = stats.for_estimator(request.estimator)
        other_var = stats.var_batch_average if request.estimator == "exact" else stats.var_pooled
        drift = measure_drift(
            stored_mean,
            stored_var,
            new_mean,
            new_var,
            samples=stats.samples,
            eps=thresholds.drift.eps,
            other_var=other_var,
            kurtosis=stats.kurtosis,
        )
        silenced = any(fnmatch.fnmatchcase(data.layer.name, pattern) for pattern in request.silence_layers)
        drifts.append(LayerDrift(data.layer, module, drift, silenced))
        rows.append(
            LayerDriftInfo(
                name=data.layer.name,
                source=data.layer.source,
                module=module,
                samples=stats.samples,
                mean_shift_median=drift.mean_shift_median,
                mean_shift_worst=drift.mean_shift_worst,
                log_var_ratio_median=drift.log_var_ratio_median,
                log_var_ratio_worst=drift.log_var_ratio_worst,
                stale=bool(drift.reasons(thresholds.drift)),
                silenced=silenced,
            )
        )
    estimator = request.estimator if result.pooled else "pytorch"
    info = RecomputeInfo(
        model=request.model,
        data=request.data,
        mode=request.mode,
        estimator=estimator,
        variance_convention=VARIANCE_CONVENTIONS[estimator]
        + ("" if result.pooled else " (a TorchScript model cannot be hooked, so only per-batch statistics exist)"),
        source=state.source,
        prefix=prefix,
        samples=result.samples,
        batches=result.batches_used,
        batches_skipped=result.batches_skipped,
        too_few_samples=any(d.drift.too_few_samples(thresholds.drift) for d in drifts),
        layers=tuple(rows),
    )
    return drifts, info
