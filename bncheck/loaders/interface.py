"""The one small interface every loader implements, and the registry entry that describes a format.

A loader turns the bytes of a file into a :class:`Checkpoint`: the object tree the file holds (dicts, lists, inert
placeholders of untrusted objects) whose tensor leaves are :class:`TensorRef` s, named as a torch ``state_dict()``
names them, so discovery and the rules read every format alike. A ``TensorRef`` knows its dtype and shape from the
file's metadata and reads its bytes only when asked, so a caller that needs three tensors out of a thousand reads
three. A :class:`Format` says what a loader reads: it is all the rest of bncheck knows about the format.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from bncheck.errors import CorruptCheckpointError, NoDataError

if TYPE_CHECKING:  # numpy only for annotations: the format registry is read by `bncheck --help`
    import numpy as np

    from bncheck.loaders.files import ByteSource


@dataclass(frozen=True, kw_only=True)
class Format:
    """A checkpoint format: how to recognise it, which files hold it, how to open it, and what its layers can hold.

    ``reader`` names the ``module:function`` (a ByteSource -> Checkpoint) imported when a file of this format is
    first opened, so that a run over safetensors files never imports the zip and pickle machinery.
    """

    name: str
    # what a file of this format is, for a note when its name says otherwise ("a torch.save file")
    described: str
    # names that hold this format: a directory search picks them up, and a file so named is expected to be it
    suffixes: tuple[str, ...]
    # whether the first (up to 512) bytes and the file name are this format's; tried in registry order
    matches: Callable[[bytes, str], bool]
    reader: str
    # whether a BatchNorm layer of this format stores num_batches_tracked (torch's batch counter) at all
    batch_counter: bool = True
    # whether the format stores tensors sorted by name (safetensors) rather than in the model's order
    sorted_names: bool = False
    # for formats whose leading bytes another format shares (a .pt2 archive is a zip, as a torch.save file is): the
    # ``module:function`` (a ByteSource -> bool) that decides from the file's contents whether it is this format's;
    # imported only when the leading bytes match
    claims: str | None = None


@functools.lru_cache(maxsize=4096)  # asked once per tensor, of a few distinct shapes per checkpoint
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element strides of a C-contiguous tensor of ``shape`` (as torch computes them, empty dimensions as 1)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class ByteLocation(NamedTuple):
    """Where a tensor's elements live in the file, so that a copy can be patched in place. (A named tuple: one is
    made for every tensor of a checkpoint, and a tuple costs a fraction of a frozen dataclass.)"""

    path: Path
    member: str | None  # the zip member holding the storage, or None for a plain file
    offset: int  # bytes from the start of the member's data (zip) or of the file
    strides: tuple[int, ...]  # in elements
    big_endian: bool = False


class TensorRef:
    """A tensor in a checkpoint, described by metadata and read on demand.

    ``reader`` returns the values; ``location`` says where they are in a local file (for patching in place);
    ``span`` is the (source, offset, length) that reading needs, when known before reading (remote reads are
    prefetched); ``no_data`` says why the file records this tensor without any values (see :func:`without_data`),
    or is None when it holds them. Made once per tensor of a checkpoint (tens of thousands), so a plain class with
    slots rather than a dataclass; nothing changes one after it is made.
    """

    __slots__ = ("dtype", "location", "no_data", "reader", "shape", "span")

    def __init__(
        self,
        dtype: str,
        shape: tuple[int, ...],
        reader: Callable[[], np.ndarray],
        location: ByteLocation | None = None,
        span: tuple[ByteSource, int, int] | None = None,
        no_data: str | None = None,
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.reader = reader
        self.location = location
        self.span = span
        self.no_data = no_data

    def __repr__(self) -> str:
        return f"TensorRef(dtype={self.dtype!r}, shape={self.shape!r}, no_data={self.no_data!r})"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        """The tensor's values as a numpy array (bfloat16 as float32); raises BncheckError if unreadable."""
        try:
            array = self.reader()
        except ValueError as exc:  # numpy refusing the file's shape: over 64 dimensions, over 2**63 elements...
            what = f"shape {self.shape}" if len(self.shape) <= 8 else f"{len(self.shape)} dimensions"
            raise CorruptCheckpointError(f"a tensor of {what} cannot be read: {exc}"[:300]) from exc
        if array.shape != self.shape:
            raise CorruptCheckpointError(f"tensor data has shape {array.shape}, metadata says {self.shape}")
        return array


def without_data(dtype: str, shape: tuple[int, ...], reason: str) -> TensorRef:
    """A tensor the file names but holds no values for: an uninitialised lazy buffer (torch pickles only its
    class), a meta-device tensor (only dtype, size and stride), a storage resized to zero behind a non-empty shape.
    ``reason`` says which; reading it raises NoDataError."""

    def refuse() -> np.ndarray:
        raise NoDataError(f"the file holds no values for this tensor ({reason})")

    return TensorRef(dtype=dtype, shape=shape, reader=refuse, no_data=reason)


def in_memory(array: np.ndarray, dtype: str) -> TensorRef:
    """A TensorRef over an array that is already in memory (the legacy torch fallback)."""
    return TensorRef(dtype=dtype, shape=tuple(array.shape), reader=lambda: array)


# Where an exported graph's settings come from, as the report names them. An ONNX reader may add its evidence in
# brackets: "ONNX BatchNormalization node (is_test=0)".
EXPORTED_PROGRAM = "torch.export batch_norm call"
ONNX_NODE = "ONNX BatchNormalization node"


@dataclass(frozen=True)
class RecordedCall:
    """One BatchNorm call of an exported graph (.pt2, ONNX) with the arguments the graph records for it, read from
    the file and never run. A layer called twice has two."""

    layer: str  # the layer's name as its statistics are named ("layer1.0.bn1")
    source: str  # where the arguments were read, as the report shows it (bncheck.layer_config.EXPORTED_PROGRAM...)
    arguments: tuple[tuple[str, Any], ...]  # ("training", True), ("momentum", 0.1), ("eps", 1e-05)


@dataclass(frozen=True)
class Checkpoint:
    """What a loader found in one file (or one sharded set of files).

    ``globals`` lists the pickle globals that bncheck's reader did not answer with a stand-in of its own, in the
    order the pickles named them (``module.name``, or ``module:dotted.name`` for an attribute path); each became an
    inert placeholder. The checks grade them with ``bncheck.pickle_globals``. ``notes`` are facts worth telling the
    user that are not findings (the extension disagrees with the content, a full module was pickled...).
    """

    format: str
    root: Any
    globals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    size_bytes: int | None = None
    # from the Format: whether the layers can carry num_batches_tracked (rules about the counter ask)
    batch_counter: bool = True
    # from the Format: whether the file lists tensors sorted by name rather than in the model's order
    sorted_names: bool = False
    # TorchScript archives: the text of each code/ file (path below code/, text), read and never run; the layers'
    # momentum, eps and baked training flags are parsed from it (bncheck.layer_config)
    code: tuple[tuple[str, str], ...] = ()
    # exported graphs: each BatchNorm call's recorded arguments (training flag, momentum, eps)
    calls: tuple[RecordedCall, ...] = ()
