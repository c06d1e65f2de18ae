"""Write a copy of a checkpoint whose running statistics are recomputed on sample data, touching nothing else.

The copy is patched in place: the new values are written over the old bytes of each tensor, in its own dtype and
byte order, so every other entry (pickled objects, metadata, optimizer state) stays byte-for-byte identical and no
pickle is ever loaded or written. For zip archives the CRC-32 of each patched member is updated in the local
header, the data descriptor and the central directory. The copy is written to a temporary file beside the target,
re-read and checked, and only then renamed into place, so a killed process never leaves a partial file at the
target.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.api import inspect_file
from bncheck.checks import RULES, Thresholds
from bncheck.config import Options
from bncheck.discover import find_bn_layers
from bncheck.errors import BncheckError, WriteError
from bncheck.loaders import INDEX_SUFFIX, is_url, open_checkpoint
from bncheck.loaders.dtypes import ITEMSIZE, array_to_bytes
from bncheck.loaders.files import LocalSource
from bncheck.loaders.interface import ByteLocation, TensorRef
from bncheck.loaders.torch_zip import member_data_start
from bncheck.recompute import Progress, RecomputeRequest, prepare, run_model
from bncheck.report import FileReport, Severity

if TYPE_CHECKING:
    from bncheck.validate import Validation, ValidationRequest

PathLike = str | os.PathLike[str]


def recalibrate(
    checkpoint: PathLike,
    output: PathLike,
    request: RecomputeRequest,
    *,
    force: bool = False,
    validate: ValidationRequest | str | None = None,
    allow_worse: bool = False,
    thresholds: Thresholds | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Write ``output``: ``checkpoint`` with the running statistics recomputed in train mode on the sample data.

    Only the BatchNorm buffers of the state dict that fits the model change (``num_batches_tracked`` becomes the
    number of batches used); every other byte is kept. A layer the model run did not measure (not reached, or a
    TorchScript layer traced in eval mode) is left exactly as stored and named in the report. The copy is inspected
    before it is renamed into place. Returns the report of the written file; raises BncheckError when nothing could
    be written.

    ``force`` replaces an existing ``output``. ``validate`` (labelled data: a ``ValidationRequest``, or its data
    spec alone) scores the model in eval mode with the stored and with the recomputed statistics on the same
    batches; the result is a note of the report, and when recalibration scores worse nothing is written (a
    WriteError that names both scores) unless ``allow_worse``.
    """
    report, _ = recalibrate_validated(
        checkpoint,
        output,
        request,
        force=force,
        validate=validate,
        allow_worse=allow_worse,
        thresholds=thresholds,
        progress=progress,
    )
    return report


def recalibrate_validated(
    checkpoint: PathLike,
    output: PathLike,
    request: RecomputeRequest,
    *,
    force: bool = False,
    validate: ValidationRequest | str | None = None,
    allow_worse: bool = False,
    thresholds: Thresholds | None = None,
    progress: Progress | None = None,
) -> tuple[FileReport, Validation | None]:
    """``recalibrate``, also returning the validation scores (None without ``validate``)."""
    source, target = _check_paths(checkpoint, output, request, force=force)
    if isinstance(validate, str):
        from bncheck.validate import ValidationRequest

        validate = ValidationRequest(data=validate)
    if validate is not None:
        from bncheck.validate import check_validation

        check_validation(validate, batch_size=request.batch_size)
    options = Options(thresholds=thresholds or Thresholds())
    workload = prepare(request, progress)
    root = open_checkpoint(source).root
    state, prefix, result = run_model(root, workload, "train")
    layers = {layer.name: layer for layer in find_bn_layers(root) if layer.source == state.source}
    patches = {}
    # what the copy will hold, per module and buffer, rounded to the file's dtype: what validation scores
    new_buffers: dict[str, dict[str, Any]] = {}
    for module, stats in result.layers.items():
        layer = layers.get(prefix + module)
        if layer is None:
            continue
        mean, var = stats.for_estimator(request.estimator)
        new_values = {"running_mean": mean, "running_var": var, "num_batches_tracked": np.array(result.batches_used)}
        for name, values in new_values.items():
            if name in layer.tensors:
                patches[layer.tensors[name]] = values
                if name != "num_batches_tracked":
                    new_buffers.setdefault(module, {})[name] = _as_stored(values, layer.tensors[name].dtype)
    if not patches:
        raise WriteError("the model ran no BatchNorm layer that the checkpoint stores; nothing to recalibrate")
    validation = None
    if validate is not None:
        from bncheck.validate import check_not_worse, validate_statistics

        validation = validate_statistics(
            workload.model,
            validate,
            new_buffers,
            batch_size=request.batch_size,
            inputs=request.inputs,
            max_samples=request.max_samples,
            device=workload.device,
        )
        check_not_worse(validation, allow_worse=allow_worse)

    def verify(written: Path) -> None:
        report = inspect_file(written, options=options)
        if report.error is not None:
            raise WriteError(f"the recalibrated copy cannot be read back: {report.error.message}")
        # only the statistics were rewritten: the pickle's globals (BN101) and the layers' configuration (BN014-BN017)
        # are the input's, copied byte for byte, and their findings are reported on the input
        errors = [
            f
            for f in report.findings
            if f.severity is Severity.ERROR and f.code != "BN101" and RULES[f.code].scope != "config"
        ]
        if errors:
            raise WriteError(f"the recalibrated copy fails inspection: {errors[0].code} {errors[0].message}")

    _write_once(request, lambda: patch_copy(source, target, patches, verify=verify))
    report = inspect_file(target, options=options)
    kept = tuple(
        f"not recalibrated, left as stored: {prefix + module or '(root)'} ({reason})"
        for module, reason in result.unmeasured.items()
        if prefix + module in layers
    )
    scored = () if validation is None else (validation.summary(),)
    return dataclasses.replace(report, notes=report.notes + result.notes + kept + scored), validation


def _write_once(request: RecomputeRequest, write: Callable[[], None]) -> None:
    """Write the copy; under torchrun only rank 0 writes, and every rank learns whether it could (then all read it
    back, or all raise rank 0's error)."""
    ranks = request.ranks
    if ranks is None:
        write()
        return
    failure: BncheckError | None = None
    if ranks.leader:
        try:
            write()
        except BncheckError as exc:
            failure = exc
    ranks.combine(failure if failure is not None else True)


def _as_stored(values: np.ndarray, dtype: str) -> Any:
    """``values`` as the copy will hold them: rounded to the tensor's dtype in the file (fp16, bf16...)."""
    import torch

    stored = getattr(torch, dtype, None)
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    return tensor.to(stored) if isinstance(stored, torch.dtype) and stored.is_floating_point else tensor


def _check_paths(
    checkpoint: PathLike, output: PathLike, request: RecomputeRequest, *, force: bool
) -> tuple[Path, Path]:
    """Refuse, before running anything, what recalibration must not or cannot do."""
    if is_url(checkpoint) or is_url(output):
        raise WriteError("recalibrate reads and writes local files; download the checkpoint first")
    source, target = Path(checkpoint), Path(output)
    if request.mode != "train":
        raise WriteError("recalibration writes train-mode statistics; --mode eval only measures")
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise WriteError("refusing to overwrite the input checkpoint; choose another output path")
    if target.is_dir():  # --force replaces a file, never a directory
        raise WriteError(f"{target} is a directory; give the path of the file to write")
    if target.exists() and not force:
        raise WriteError(f"{target} exists; pass --force to replace it")
    if source.is_dir() or source.name.endswith(INDEX_SUFFIX):
        raise WriteError("recalibrate writes single-file checkpoints; sharded checkpoints are not supported yet")
    return source, target


def _element_offsets(shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """Element offsets of a strided view, in C order."""
    offsets = np.zeros(1, dtype=np.int64)
    for size, stride in zip(shape, strides, strict=True):
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
    return offsets


def _write_elements(handle: object, base: int, ref: TensorRef, location: ByteLocation, values: np.ndarray) -> None:
    assert hasattr(handle, "seek") and hasattr(handle, "write")
    itemsize = ITEMSIZE[ref.dtype]
    flat = np.ascontiguousarray(values.reshape(ref.shape)).reshape(-1)
    offsets = _element_offsets(ref.shape, location.strides)
    contiguous = np.array_equal(offsets, np.arange(offsets.size))
    encoded = array_to_bytes(flat, ref.dtype, big_endian=location.big_endian)
    if contiguous:
        handle.seek(base + location.offset)
        handle.write(encoded)
        return
    for index, element in enumerate(offsets):
        handle.seek(base + location.offset + int(element) * itemsize)
        handle.write(encoded[index * itemsize : (index + 1) * itemsize])


def _fix_zip_crcs(path: Path, infos: Mapping[str, zipfile.ZipInfo], starts: Mapping[str, int]) -> None:
    """Recompute the CRC-32 of patched members wherever the archive records it."""
    with zipfile.ZipFile(path) as archive:
        cd_offset = archive.start_dir
    with path.open("r+b") as handle:
        new_crcs: dict[str, int] = {}
        for name, info in infos.items():
            if info.compress_type != zipfile.ZIP_STORED:
                raise WriteError(f"cannot patch compressed archive member {name}")
            start = starts[name]
            handle.seek(start)
            crc = zlib.crc32(handle.read(info.file_size)) & 0xFFFFFFFF
            new_crcs[name] = crc
            handle.seek(info.header_offset + 14)
            if struct.unpack("<I", handle.read(4))[0] != 0:  # torch leaves it 0 and uses a data descriptor
                handle.seek(info.header_offset + 14)
                handle.write(struct.pack("<I", crc))
            if info.flag_bits & 0x08:
                handle.seek(start + info.compress_size)
                descriptor = handle.read(8)
                at = start + info.compress_size + (4 if descriptor[:4] == b"PK\x07\x08" else 0)
                handle.seek(at)
                handle.write(struct.pack("<I", crc))
        # central directory: 46-byte entries followed by name, extra field and comment
        position = cd_offset
        while True:
            handle.seek(position)
            entry = handle.read(46)
            if entry[:4] != b"PK\x01\x02":
                break
            name_len, extra_len, comment_len = struct.unpack("<HHH", entry[28:34])
            name = handle.read(name_len).decode("utf-8", "replace")
            if name in new_crcs:
                handle.seek(position + 16)
                handle.write(struct.pack("<I", new_crcs[name]))
            position += 46 + name_len + extra_len + comment_len


def patch_copy(
    source: Path,
    target: Path,
    patches: Mapping[TensorRef, np.ndarray],
    *,
    verify: Callable[[Path], None],
) -> None:
    """Copy ``source`` to ``target`` with each patched tensor's values replaced.

    ``verify`` is called on the finished temporary copy and must raise to stop the rename.
    """
    locations = {}
    for ref in patches:
        if ref.location is None or ref.location.path != source:
            raise WriteError("a tensor to write does not live in the source file (legacy files cannot be patched)")
        locations[ref] = ref.location
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bncheck-tmp", dir=target.parent)
    except OSError as exc:
        raise WriteError(f"cannot write beside {target}: {exc.strerror or exc}") from exc
    temp = Path(temp_name)
    try:
        # the copy keeps the input's permission bits, not mkstemp's 0600
        os.fchmod(fd, stat.S_IMODE(source.stat().st_mode))
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, length=1024 * 1024)
        members = {loc.member for loc in locations.values() if loc.member is not None}
        infos: dict[str, zipfile.ZipInfo] = {}
        if members:
            with zipfile.ZipFile(temp) as archive:
                infos = {name: archive.getinfo(name) for name in members}
        copy = LocalSource(temp)
        starts = {name: member_data_start(copy, info) for name, info in infos.items()}
        copy.close()
        with temp.open("r+b") as handle:
            for ref, values in patches.items():
                location = locations[ref]
                if math.prod(ref.shape) != np.asarray(values).size:
                    raise WriteError(f"new values have {np.asarray(values).size} elements, tensor has {ref.shape}")
                base = starts[location.member] if location.member is not None else 0
                _write_elements(handle, base, ref, location, np.asarray(values))
            handle.flush()
            os.fsync(handle.fileno())
        if members:
            _fix_zip_crcs(temp, infos, starts)
            with zipfile.ZipFile(temp) as archive:
                broken = archive.testzip()
            if broken is not None:
                raise WriteError(f"patched archive member {broken} fails its CRC check")
        verify(temp)
        temp.replace(target)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    _fsync_directory(target.parent)


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable: until its directory is synced, a power loss may undo it."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
