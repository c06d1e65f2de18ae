"""Recompute BatchNorm statistics by running a model over sample data. Needs torch, imported lazily.

Train mode re-estimates the statistics the way training sees them: only the BatchNorm layers train (dropout and
the rest stay in eval), each normalises with its batch statistics, and each layer's input is accumulated per
channel in float64 with an exact streaming merge (Chan et al.), so the result does not depend on how samples are
split into batches. Eval mode measures what each layer receives at inference, with every layer normalising by the
stored statistics. Either way the model is left exactly as it was found.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from bncheck.checks import LayerDrift, Thresholds
from bncheck.discover import StateDict, find_state_dicts
from bncheck.drift import measure_drift
from bncheck.errors import BncheckError, DataError, ModelError, first_line
from bncheck.layer_config import module_config
from bncheck.moments import TAIL_SAMPLES, Moments, channel_moments, reduced_dims, tail_moments
from bncheck.read import LayerData
from bncheck.report import LayerConfig, LayerDriftInfo, RecomputeInfo, UnmeasuredLayer
from bncheck.summary import packed

if TYPE_CHECKING:
    import torch

    from bncheck.distributed import Ranks
    from bncheck.model_data import SampleData

Mode = Literal["train", "eval"]

# What recomputation reads unless told otherwise: enough samples for BN012's noise floor to sit below its practical
# limits on most layers, few enough that an endless or huge loader ends in seconds on a CPU.
DEFAULT_MAX_SAMPLES = 4096
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
    # None: the whole loader
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    # indexes or keys choosing the model's inputs from each tuple or dict batch (--inputs)
    inputs: tuple[str, ...] = ()
    mode: Mode = "train"
    estimator: Estimator = "exact"
    device: str = "cpu"
    # the checkpoint entry to load into the model (e.g. state_dict_ema); None: the one that fits
    source: str | None = None
    # fnmatch patterns of layer names whose BN012 is silenced
    silence_layers: tuple[str, ...] = ()
    # under torchrun: this process's rank (bncheck.distributed.from_environment); each rank runs its share
    ranks: Ranks | None = None


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

    def add_batch(self, samples: int, mean: np.ndarray, var: np.ndarray, batches: int = 1) -> None:
        """One batch's mean and unbiased variance, for the per-batch average (all a TorchScript model gives); or,
        with ``batches``, the sums of that many."""
        self.batch_mean_sum = mean if self.batch_mean_sum is None else self.batch_mean_sum + mean
        self.batch_var_sum = var if self.batch_var_sum is None else self.batch_var_sum + var
        self.batches += batches
        self.samples += samples

    def merge(self, other: _LayerAccumulator) -> None:
        """Add what another rank measured at the same layer (exact: moments merge like batches)."""
        self.pooled.merge(other.pooled)
        self.tail.merge(other.tail)
        if other.batch_mean_sum is not None and other.batch_var_sum is not None:
            self.add_batch(other.samples, other.batch_mean_sum, other.batch_var_sum, other.batches)


@dataclass
class Tally:
    """What one process measured over its batches; under torchrun the ranks' tallies are merged in rank order."""

    layers: dict[str, _LayerAccumulator]
    used: int = 0
    skipped: int = 0
    samples: int = 0

    def merge(self, other: Tally) -> None:
        for name, accumulator in other.layers.items():
            self.layers.setdefault(name, _LayerAccumulator()).merge(accumulator)
        self.used += other.used
        self.skipped += other.skipped
        self.samples += other.samples


def _combined(tally: Tally, failure: BncheckError | None, ranks: Ranks | None) -> Tally:
    """This process's tally, or under torchrun every rank's merged (the same on every rank). A failure in any rank
    is raised in every rank."""
    if ranks is None:
        if failure is not None:
            raise failure
        return tally
    merged = Tally(layers={})
    for part in ranks.combine(failure if failure is not None else tally):
        merged.merge(part)
    return merged


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


@dataclass(frozen=True, kw_only=True)
class RecomputeResult:
    layers: dict[str, LayerStatistics]
    batches_used: int
    batches_skipped: int
    samples: int
    mode: Mode
    # False for TorchScript models, whose layers cannot be hooked: only per-batch statistics exist
    pooled: bool = True
    # BatchNorm modules that were not measured, and why; their statistics must never be written
    unmeasured: Mapping[str, str] = field(default_factory=dict)
    # what was done to the inputs on the way (a cast), for the report
    notes: tuple[str, ...] = ()


NOT_REACHED = "not reached by the forward pass on this data"

# Below this many samples per batch, train-mode statistics of deeper layers drift from those of training-sized
# batches (README, "Batch size").
SMALL_BATCH = 16


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


class PreservedModel:
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


class _Scratch:
    """One buffer, reused by every layer and batch, for the two-pass reduction's deviations from the mean. A fresh
    activation-sized tensor per call costs more than the arithmetic: large allocations come from new pages that the
    kernel zero-fills (a 32 MB input: ~1.5 ms to subtract into a reused buffer, ~13 ms into a new one, bench run)."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor with ``x``'s shape and strides (``x`` dense and starting its storage)."""
        import torch

        needed = x.numel()
        if (
            self.flat is None
            or self.flat.numel() < needed
            or self.flat.dtype != x.dtype
            or self.flat.device != x.device
        ):
            self.flat = torch.empty(needed, dtype=x.dtype, device=x.device)
        return self.flat.as_strided(x.shape, x.stride())


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s strides cover exactly ``x.numel()`` elements, as a contiguous or channels-last tensor's do."""
    import torch

    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.is_contiguous() or (x.dim() in formats and x.is_contiguous(memory_format=formats[x.dim()]))


class _BatchStatisticsForward:
    """Replaces a BatchNorm's train-mode forward until ``remove()`` (listed with the hook handles, which are
    removed the same way). The stand-in computes each channel's batch mean and biased variance once, records them,
    and normalises with them: the train-mode output, without touching the layer's running statistics.

    Contiguous float32/float64 inputs go through torch's fused train-mode kernel without running statistics (one
    pass for the statistics, one for the output, as update_bn pays); its reduction is exact to ~1e-7 on contiguous
    inputs only (on channels_last CPU inputs it is off by up to 1e-4 in the variance). Other layouts take two passes
    in the input's dtype (float32: about 1e-7 relative to float64, within 1e-6 by bench/recompute_speed.py) and
    normalise through ``F.batch_norm(training=False)``. Other dtypes keep the layer's own forward and are measured in
    float64."""

    def __init__(self, module: Any, measured: dict[str, Moments], name: str, scratch: _Scratch) -> None:
        # Any: the BatchNorm attributes (eps, weight, _check_input_dim) are not on torch.nn.Module's type
        import torch
        import torch.nn.functional as F
        from torch.nn.modules.batchnorm import _BatchNorm

        fused = getattr(torch, "_native_batch_norm_legit", None)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in (torch.float32, torch.float64):
                measured[name] = channel_moments(x)
                return _BatchNorm.forward(module, x)
            module._check_input_dim(x)
            count = x.numel() // x.shape[1]
            if fused is not None and x.is_contiguous():
                output, mean, invstd = fused(x, module.weight, module.bias, True, 0.0, module.eps)
                biased = _biased_variance(x, invstd, module.eps)
                measured[name] = Moments(count, mean.double().cpu().numpy(), biased * count)
                return output  # type: ignore[no-any-return]
            dims = reduced_dims(x)
            mean = x.mean(dim=dims, keepdim=True)
            deviations = torch.sub(x, mean, out=scratch.like(x)) if _dense(x) else x - mean
            var = deviations.square_().mean(dim=dims)
            mean = mean.flatten()
            measured[name] = Moments(count, mean.double().cpu().numpy(), var.double().cpu().numpy() * count)
            return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)

        self.module = module
        module.forward = forward

    def remove(self) -> None:
        del self.module.forward


def _biased_variance(x: torch.Tensor, invstd: torch.Tensor, eps: float) -> np.ndarray:
    """Each channel's biased variance from the fused kernel's ``1/sqrt(var + eps)`` (float64). Where the variance
    is not well above eps, that difference loses digits, so those channels are reduced again exactly."""
    import torch

    var: np.ndarray = invstd.double().cpu().numpy() ** -2 - eps
    imprecise = np.flatnonzero(var < 100 * eps)
    if imprecise.size:
        again = x.index_select(1, torch.from_numpy(imprecise).to(x.device))
        exact = channel_moments(again)
        assert exact.m2 is not None
        var[imprecise] = exact.m2 / exact.count
    return var


def recompute_statistics(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    mode: Mode = "train",
    device: str = "cpu",
    on_batch: Callable[[int], None] | None = None,
    ranks: Ranks | None = None,
) -> RecomputeResult:
    """Run ``model`` over ``batches`` and measure every BatchNorm layer's input, per channel.

    ``on_batch`` is called with the number of samples of each batch processed (for a progress bar). With ``ranks``
    (under torchrun) ``batches`` are this rank's share, and the result is every rank's merged.
    """
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        return _recompute_scripted(model, batches, mode=mode, device=device, on_batch=on_batch, ranks=ranks)
    modules = batchnorm_modules(model)
    dtype, casts = floating_dtype(model), set[str]()
    tally = Tally(layers={name: _LayerAccumulator() for name in modules})
    accumulators = tally.layers
    failure: BncheckError | None = None
    pending: dict[str, _Call] = {}
    expected_calls: dict[str, int] | None = None  # learnt on the first batch
    calls: dict[str, int] = {}
    measured: dict[str, Moments] = {}  # this call's moments, from the pre-hook or the replaced forward
    tails: dict[str, Moments] = {}
    replaced = {name for name, module in modules.items() if mode == "train" and _plain_batchnorm(module)}
    scratch = _Scratch()

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

    preserved = PreservedModel(model, modules)
    handles: list[Any] = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
        if name in replaced:
            handles.append(_BatchStatisticsForward(module, measured, name, scratch))
    try:
        model.eval()
        if mode == "train":
            for module in modules.values():
                module.train()
        with torch.inference_mode():
            for batch in batches:
                pending.clear()
                calls.clear()
                args, kwargs = moved_inputs(batch, device, dtype, casts)
                try:
                    model(*args, **kwargs)
                except _SkipBatch:
                    tally.skipped += 1
                    continue
                except _StopForward:
                    pass
                except Exception as exc:  # the model's own code failed on this data
                    raise _model_failed(exc) from exc
                if expected_calls is None:
                    expected_calls = dict(calls)
                for name, call in pending.items():
                    accumulators[name].add(call)
                tally.used += 1
                batch_size = batch_size_of(batch)
                tally.samples += batch_size
                if on_batch is not None:
                    on_batch(batch_size)
    except BncheckError as exc:
        if ranks is None:
            raise
        failure = exc  # the other ranks hear of it at the merge, instead of waiting there
    finally:
        for handle in handles:
            handle.remove()
        preserved.restore()
    tally = _combined(tally, failure, ranks)
    return RecomputeResult(
        layers={name: _finish(name, acc) for name, acc in tally.layers.items() if acc.batches},
        batches_used=tally.used,
        batches_skipped=tally.skipped,
        samples=tally.samples,
        mode=mode,
        unmeasured={name: NOT_REACHED for name, acc in tally.layers.items() if not acc.batches},
        notes=_cast_notes(casts, dtype),
    )


def _recompute_scripted(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    mode: Mode,
    device: str,
    on_batch: Callable[[int], None] | None,
    ranks: Ranks | None,
) -> RecomputeResult:
    """TorchScript runs no Python hooks, so each layer's own update is read back: with the stored statistics zeroed
    before each batch, one train-mode step leaves ``factor * batch statistic`` in the buffers, where the factor is
    the momentum the layer really uses (see ``scripted_update_factors``). Only per-batch statistics are available
    this way, so the result is the per-batch average (update_bn's convention)."""
    import torch

    if mode != "train":
        raise ModelError("eval mode needs each layer's input, which a TorchScript model does not expose")
    modules = batchnorm_modules(model)
    factors, unmeasured = scripted_update_factors(modules)
    notes = _baked_dropout(model)
    dtype, casts = floating_dtype(model), set[str]()
    tally = Tally(layers={name: _LayerAccumulator() for name in factors})
    failure: BncheckError | None = None
    preserved = PreservedModel(model, modules)
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
                args, kwargs = moved_inputs(batch, device, dtype, casts)
                try:
                    model(*args, **kwargs)
                except Exception as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise _model_failed(exc) from exc
                    tally.skipped += 1
                    continue
                size = batch_size_of(batch)
                for name, factor in factors.items():
                    buffers = dict(modules[name].named_buffers(recurse=False))
                    if int(buffers["num_batches_tracked"]) == 0:
                        continue  # not reached by this batch
                    mean = buffers["running_mean"].double().cpu().numpy() / factor
                    var = buffers["running_var"].double().cpu().numpy() / factor
                    tally.layers[name].add_batch(size, mean, var)
                tally.used += 1
                tally.samples += size
                if on_batch is not None:
                    on_batch(size)
    except BncheckError as exc:
        if ranks is None:
            raise
        failure = exc
    finally:
        preserved.restore()
    tally = _combined(tally, failure, ranks)
    layers = {}
    for name, acc in tally.layers.items():
        if acc.batches and acc.batch_mean_sum is not None and acc.batch_var_sum is not None:
            mean, var = acc.batch_mean_sum / acc.batches, acc.batch_var_sum / acc.batches
            layers[name] = LayerStatistics(name, mean, var, mean, var, acc.samples, 0, acc.batches)
        else:
            unmeasured[name] = NOT_REACHED
    return RecomputeResult(
        layers=layers,
        batches_used=tally.used,
        batches_skipped=tally.skipped,
        samples=tally.samples,
        mode=mode,
        pooled=False,
        unmeasured=unmeasured,
        notes=notes + _cast_notes(casts, dtype),
    )


_DROPOUT_CALLS = frozenset({"aten::dropout", "aten::feature_dropout", "aten::alpha_dropout"})


def _baked_dropout(model: torch.nn.Module) -> tuple[str, ...]:
    """A note when a traced graph runs dropout in train mode whatever ``eval()`` says (baked when traced)."""
    for module in model.modules():
        graph: Any = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes():
            if node.kind() not in _DROPOUT_CALLS:
                continue
            _, rate, train = (_constant(value) for value in node.inputs())
            if train is True and rate != 0:
                return (
                    "this traced model runs dropout in train mode (baked in when it was traced), so the inputs of "
                    "deeper BatchNorm layers include dropout noise",
                )
    return ()


def scripted_update_factors(modules: Mapping[str, torch.nn.Module]) -> tuple[dict[str, float], dict[str, str]]:
    """For each TorchScript BatchNorm, the weight of the new batch in one train-mode update from zeroed buffers,
    or why the layer cannot be measured.

    A scripted layer (``torch.jit.script``) keeps its Python logic: it follows ``train()`` and its ``momentum``
    attribute (None: cumulative, which weighs the first batch by 1). A traced layer (``torch.jit.trace``) has
    neither: the ``training`` flag and momentum of its ``batch_norm`` call were baked into the graph as constants
    when it was traced, so they are read from there; a layer traced in eval mode always normalises with its stored
    statistics and cannot be measured at all.
    """
    factors: dict[str, float] = {}
    unmeasured: dict[str, str] = {}
    for name, module in modules.items():
        if hasattr(module, "momentum"):
            momentum: Any = module.momentum
            factors[name] = 1.0 if momentum is None else float(momentum)
            if not 0 < factors[name] <= 1:
                unmeasured[name] = f"its momentum {momentum} never lets a batch into the running statistics"
                del factors[name]
            continue
        graph: Any = module.graph
        calls = [node for node in graph.nodes() if node.kind() == "aten::batch_norm"]
        if len(calls) != 1:
            unmeasured[name] = f"its traced graph has {len(calls)} batch_norm calls; exactly one can be read back"
            continue
        arguments = list(calls[0].inputs())  # input, weight, bias, mean, var, training, momentum, eps, cudnn
        training, momentum = (_constant(value) for value in arguments[5:7])
        if training is False:
            unmeasured[name] = (
                "traced in eval mode: its batch_norm call always normalises with the stored statistics, so its "
                "input cannot be measured (trace the model in train mode, or give a module factory)"
            )
        elif training is not True or not isinstance(momentum, float) or not 0 < momentum <= 1:
            unmeasured[name] = "its traced batch_norm call does not state a constant training flag and momentum"
        else:
            factors[name] = momentum
    return factors, unmeasured


def _constant(value: Any) -> Any:
    """The value of a TorchScript graph input that is a constant, else None."""
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


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


def floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter or buffer: what its floating inputs are cast to."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def moved_inputs(
    batch: Batch, device: str, dtype: torch.dtype | None, casts: set[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The batch's tensors, nested ones included, on ``device``; floating ones cast to the model's dtype (each
    dtype cast is recorded in ``casts``)."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if dtype is not None and value.is_floating_point() and value.dtype != dtype:
                casts.add(str(value.dtype).removeprefix("torch."))
                value = value.to(dtype)
            return value.to(device)
        if isinstance(value, tuple | list):
            return type(value)(move(v) for v in value)
        if isinstance(value, Mapping):
            return {k: move(v) for k, v in value.items()}
        return value

    return tuple(move(a) for a in batch.args), {k: move(v) for k, v in batch.kwargs.items()}


def _cast_notes(casts: set[str], dtype: torch.dtype | None) -> tuple[str, ...]:
    target = str(dtype).removeprefix("torch.")
    return tuple(f"{source} inputs were cast to {target}, the model's dtype" for source in sorted(casts))


def batch_size_of(batch: Batch) -> int:
    """The number of samples of a batch: the first dimension of its first tensor, nested ones included."""
    import torch

    stack: list[Any] = [*batch.args, *batch.kwargs.values()]
    while stack:
        value = stack.pop(0)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, tuple | list):
            stack[:0] = list(value)
        elif isinstance(value, Mapping):
            stack[:0] = list(value.values())
    return 0


def _model_failed(exc: Exception) -> ModelError:
    message = f"the model failed on the sample data: {first_line(exc)}"
    if isinstance(exc, TypeError | AttributeError):  # the usual sign of batches shaped unlike the model's inputs
        message += "; if each batch holds more than the model's inputs, choose them with --inputs (e.g. 0 or image)"
    return ModelError(message)


class Progress(Protocol):
    """Where recomputation says how far it is (a progress bar)."""

    def start(self, total_samples: int | None) -> None:
        """A pass over the data begins; its number of samples when known."""

    def advance(self, samples: int) -> None:
        """A batch of this many samples was processed."""


@dataclass
class Workload:
    """The model and sample data of a RecomputeRequest, built once and shared by every checkpoint."""

    request: RecomputeRequest
    model: Any
    # this process's share of the data (all of it, outside torchrun)
    data: SampleData
    progress: Progress | None = None
    # where the model runs: the request's device, or under torchrun this rank's GPU
    device: str = "cpu"


def prepare(request: RecomputeRequest, progress: Progress | None = None) -> Workload:
    """Build the model and check the data spec; a spec that cannot be loaded raises ModelError / DataError. Under
    torchrun (``request.ranks``) the process group is joined first, so a data callable can shard itself."""
    from bncheck.model_data import SampleData, load_model, require_torch

    require_torch()
    if request.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    data = SampleData(
        spec=request.data, batch_size=request.batch_size, max_samples=request.max_samples, inputs=request.inputs
    )
    device, ranks = request.device, request.ranks
    if ranks is not None:
        ranks.join(device)
        device = ranks.device(device)
        data = data.shard(ranks.rank, ranks.world_size)
    data.check()
    model = load_model(request.model, kwargs=request.model_kwargs)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:  # no such device, or torch built without it
        raise ModelError(f"cannot use device {device!r}: {first_line(exc)}") from exc
    return Workload(request, model, data, progress, device)


def run_model(root: Any, workload: Workload, mode: Mode) -> tuple[StateDict, str, RecomputeResult]:
    """Load the checkpoint's state dict that fits the model into it, then rerun the model on the sample data,
    one batch at a time. Raises DataError when no batch could be used and ModelError when no layer was measured.
    """
    from bncheck.model_data import load_state_into, model_batches

    request, data, progress = workload.request, workload.data, workload.progress
    state, prefix = load_state_into(workload.model, find_state_dicts(root), source=request.source)
    notes: list[str] = []
    if progress is not None:
        progress.start(data.total_samples())
    result = recompute_statistics(
        workload.model,
        model_batches(data, workload.model, notes),
        mode=mode,
        device=workload.device,
        on_batch=progress.advance if progress is not None else None,
        ranks=request.ranks,
    )
    if result.batches_used == 0:
        if result.batches_skipped == 0:
            raise DataError(f"{request.data} holds no samples")
        raise DataError(
            f"every batch was skipped ({result.batches_skipped}): in train mode a BatchNorm needs more than one "
            "value per channel, and each batch gave one (batches of a single sample?); use --batch-size 2 or more"
        )
    if not result.layers:
        reasons = sorted(set(result.unmeasured.values()))
        raise ModelError("no BatchNorm layer could be measured: " + "; ".join(reasons or ["the model has none"]))
    return state, prefix, dataclasses.replace(result, notes=tuple(notes) + result.notes)


MODEL_SOURCE = "--model"


def model_layer_configs(model: Any, source: str, prefix: str) -> dict[tuple[str, str], LayerConfig]:
    """The configuration of each BatchNorm module of the model given with --model, by the checkpoint layer
    (source, name) it was loaded from: what a state dict does not record, as the code that loads it sets it."""
    return {
        (source, prefix + name): module_config(module, MODEL_SOURCE)
        for name, module in batchnorm_modules(model).items()
    }


def measure_checkpoint(
    root: Any,
    layers: Sequence[LayerData],
    workload: Workload,
    thresholds: Thresholds,
    *,
    channel_values: bool = False,
) -> tuple[list[LayerDrift], RecomputeInfo, dict[tuple[str, str], LayerConfig]]:
    """Load the checkpoint into the model, rerun it on the sample data, and measure each layer's drift (with
    ``channel_values``, keep the recomputed statistics channel by channel); also the configuration the model gives
    each layer (``model_layer_configs``)."""
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
                recomputed_mean=packed(new_mean) if channel_values else None,
                recomputed_var=packed(new_var) if channel_values else None,
            )
        )
    estimator = request.estimator if result.pooled else "pytorch"
    notes = list(result.notes)
    batch_mean = result.samples / result.batches_used
    if request.mode == "train" and batch_mean < SMALL_BATCH:
        notes.append(
            f"batches of {batch_mean:.3g} samples on average: in train mode every BatchNorm normalises with its "
            f"batch's statistics, so the inputs of deeper layers depend on the batch size; use batches of at least "
            f"{SMALL_BATCH} samples (--batch-size)"
        )
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
        unmeasured=tuple(
            UnmeasuredLayer(name=prefix + module, module=module, reason=reason)
            for module, reason in result.unmeasured.items()
        ),
        notes=tuple(notes),
    )
    return drifts, info, model_layer_configs(workload.model, state.source, prefix)
