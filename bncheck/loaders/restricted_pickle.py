"""A pickle reader that never runs code from the file.

``find_class`` never imports anything. The handful of globals torch itself writes into a checkpoint are answered
with bncheck's own side-effect-free stand-ins (a tensor record becomes a lazy :class:`TensorRef`); every other global
(``argparse.Namespace``, a user's model class, ``os.system``...) becomes a :class:`Placeholder` subclass that records
the arguments and state the pickle gives it and is never called. The names of those globals are kept, as
``module.name`` or, when the name is a dotted attribute path, ``module:dotted.name``, so that the checks can grade
each one (``bncheck.pickle_globals``).
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import gc
import io
import math
import pickle
import pickletools
import re
import reprlib
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, ClassVar, NamedTuple

import numpy as np

from bncheck.errors import CorruptCheckpointError
from bncheck.loaders.dtypes import ITEMSIZE
from bncheck.loaders.interface import TensorRef, contiguous_strides, without_data

# Legacy typed-storage class names that torch still writes as dtype markers (torch/storage.py).
STORAGE_CLASS_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    # dtypes without a legacy class are written as UntypedStorage plus an explicit dtype
    "UntypedStorage": "uint8",
}

TORCH_DTYPE_NAMES = frozenset(ITEMSIZE) | {"float", "double", "half", "long", "int", "short", "bool"}
_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}

# What a malformed pickle raises from inside the C unpickler or from our stand-ins given arguments of the wrong
# shape; each means "this pickle is broken", never "bncheck is broken".
PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
    DeprecationWarning,  # only the one made an error by invalid_escapes_refused()
)


@contextlib.contextmanager
def invalid_escapes_refused() -> Iterator[None]:
    """Make a protocol-0 STRING argument with an invalid escape (``S'\\G'``) raise instead of decoding leniently.

    Python decodes it with a DeprecationWarning and will refuse it in a later version. torch never writes the
    STRING opcode and its weights-only unpickler does not accept it at all, so such a pickle is refused as corrupt,
    the same way on every Python, instead of warning (or, under ``-W error``, crashing) on some.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="invalid escape sequence", category=DeprecationWarning)
        yield


class Placeholder:
    """Inert stand-in for an object of an untrusted global: it records how the pickle would build it.

    ``args``/``kwargs`` are what the class would have been called with, ``state`` what ``__setstate__`` would have
    received, ``items``/``dictitems`` what would have been appended or set. Calling a placeholder (a pickle that
    calls the result of a call) yields another placeholder; nothing of the file's ever runs.
    """

    global_name: ClassVar[str] = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]
    dictitems: dict[Any, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], dictitems={})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Recorded by ``__new__``; present so that calling the class does nothing more."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["dictitems"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["items"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["items"].extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return placeholder_class(f"{self.global_name}()")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<placeholder {self.global_name}>"


def placeholder_class(global_name: str) -> type[Placeholder]:
    """A fresh Placeholder subclass standing for ``global_name`` (pickle's NEWOBJ needs a real type)."""
    return type("Placeholder", (Placeholder,), {"global_name": global_name})


@dataclass(frozen=True)
class StorageType:
    """What ``torch.FloatStorage`` and friends mean inside a checkpoint: only a dtype."""

    dtype: str


@dataclass(frozen=True)
class TorchDType:
    name: str


class StorageRef(NamedTuple):
    """A persistent id ``('storage', type, key, location, numel)``: the bytes live in archive member data/<key>.

    Legacy files add a sixth element, ``(view_key, offset, size)`` for a view into the root storage ``key``;
    ``element_offset`` is that offset. (A named tuple: one is made per storage, tens of thousands per file.)
    """

    key: str
    dtype: str
    numel: int
    element_offset: int = 0


TensorFactory = Callable[[StorageRef, int, tuple[int, ...], tuple[int, ...], str], TensorRef]


def view_span(offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str) -> tuple[int, int]:
    """Check a tensor record's view of its storage; return the dtype's item size and the number of storage
    elements from the first to the last one the view touches (0 for an empty tensor)."""
    itemsize = ITEMSIZE.get(dtype)
    if itemsize is not None and offset >= 0 and len(size) <= 1 and len(stride) == len(size):
        # the common records, checked without the general arithmetic: a scalar, a 1-D tensor with a positive step
        if not size:
            return itemsize, 1
        if size[0] > 0 and stride[0] > 0:
            return itemsize, 1 + (size[0] - 1) * stride[0]
    if itemsize is None or len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise CorruptCheckpointError(f"malformed tensor record: {dtype}, size {size}, stride {stride}")
    if 0 in size:
        return itemsize, 0
    span = 1 + sum([(n - 1) * s for n, s in zip(size, stride, strict=True)])  # per tensor: no generator
    count = math.prod(size)
    if count > span and count > MAX_OVERLAPPING_ELEMENTS:
        raise CorruptCheckpointError(
            f"tensor record of size {size} repeats {span} stored element(s) {count} times over (stride {stride})"[:300]
        )
    return itemsize, span


# A view whose strides revisit elements (stride 0, as expand() makes) has more elements than the bytes it reads;
# beyond this many, a few bytes of a file would become gigabytes in memory.
MAX_OVERLAPPING_ELEMENTS = 1 << 20


def strided_copy(flat: np.ndarray, size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """The tensor a record describes, from the storage elements its view spans."""
    count = math.prod(size)
    if count == 0 or stride == contiguous_strides(size):
        return flat[:count].reshape(size)
    view = np.lib.stride_tricks.as_strided(
        flat, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol 2 writes Python 2 names (__builtin__, commands); they are reported and matched by their Python 3
    names, as pickle's own find_class resolves them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def recorded_name(module: str, name: str) -> str:
    """How a global is reported: ``module.name``, or ``module:dotted.name`` when protocol 4 walks a dotted name as
    attributes from the module (gzip + os.system is os.system), so it is judged where the import ends."""
    return f"{module}:{name}" if "." in name else f"{module}.{name}"


_STRING_OPCODES = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)


def scan_globals(stream: IO[bytes]) -> tuple[str, ...]:
    """The globals the pickle at the stream's position names, read from its opcodes as far as they decode, building
    nothing; the stream is left after its STOP.

    For a pickle the restricted unpickler refuses (broken, or crafted to break it) that torch might still run: what
    it names before the break is known. STACK_GLOBAL takes its names from the last two strings pushed (or fetched
    from the memo), as picklescan reads them.
    """
    names: list[str] = []
    strings: list[str] = []
    memo: dict[Any, str] = {}
    memoized = 0
    top: str | None = None  # the string on top of the stack, when the last push was one
    errors = (ValueError, TypeError, EOFError, OverflowError, UnicodeDecodeError, DeprecationWarning)
    with contextlib.suppress(*errors), warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a STRING with a bad escape ends the scan
        for opcode, arg, _ in pickletools.genops(stream):
            pushed: str | None = None
            if opcode.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                names.append(recorded_name(*_python3_name(module, name)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(recorded_name(*_python3_name(strings[-2], strings[-1])))
            elif opcode.name in _STRING_OPCODES and isinstance(arg, str):
                pushed = arg
            elif opcode.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                pushed = memo[arg]
            elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                key = memoized if opcode.name == "MEMOIZE" else arg
                memoized += opcode.name == "MEMOIZE"
                if top is not None:
                    memo[key] = top
                continue  # storing in the memo leaves the stack as it was
            elif opcode.name == "STOP":
                break
            if pushed is not None:
                strings.append(pushed)
            top = pushed
    return tuple(dict.fromkeys(names))


def globals_of(data: bytes) -> tuple[str, ...]:
    """The untrusted globals a pickle names, none of its tensors or storages resolved (a pickle torch would never
    read, hidden beside the ones it does): by the restricted unpickler, or, for one it refuses, from the opcodes up
    to where they break."""
    try:
        return unpickle(data, no_tensor, persistent_load=_unresolved_id)[1]
    except CorruptCheckpointError:
        return scan_globals(io.BytesIO(data))


def _unresolved_id(_saved_id: Any) -> None:
    """A persistent id of a pickle whose tensors are not read names nothing, and must not stop the scan."""


def no_tensor(*_: Any) -> TensorRef:
    """The tensor callback of a pickle whose tensors are not rebuilt from storage records."""
    raise CorruptCheckpointError("tensors of this pickle are not read")


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is tuple and (not value or (len(value) == 1 and type(value[0]) is int)):
        return value  # a scalar's or a 1-D tensor's: most records
    if not isinstance(value, tuple | list) or not all(type(v) is int for v in value):
        # reprlib bounds depth and length: a pickle can share one list at every level, whose full repr is 2 ** depth
        raise CorruptCheckpointError(f"malformed tensor record: {what} is {reprlib.repr(value)}")
    return tuple(value)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch's ``data.pkl`` with stand-ins for every global; see the module docstring."""

    def __init__(self, data: bytes | IO[bytes], make_tensor: TensorFactory) -> None:
        super().__init__(io.BytesIO(data) if isinstance(data, bytes) else data)
        self._make_tensor = make_tensor
        self.storages: dict[str, StorageRef] = {}
        self._placeholders: dict[str, type[Placeholder]] = {}
        self.untrusted_globals: list[str] = []
        self._safe: dict[str, Any] = {
            "collections.OrderedDict": collections.OrderedDict,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.slice": slice,
            "builtins.complex": complex,
            "torch.Size": tuple,
            "torch.device": _device,
            "_codecs.encode": _latin1_encode,
            "copyreg._reconstructor": self._reconstructor,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
            # tensors that hold no values: torch writes a meta tensor as its dtype, size and stride alone, and a lazy
            # module's uninitialised parameters and buffers as their class and requires_grad alone
            "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor,
            "torch.nn.parameter.UninitializedParameter": _uninitialised("uninitialised lazy parameter"),
            "torch.nn.parameter.UninitializedBuffer": _uninitialised("uninitialised lazy buffer"),
            # TorchScript archives wrap typed lists and tagged values in these; each returns its argument.
            "torch.jit._pickle.build_intlist": _typed_list,
            "torch.jit._pickle.build_doublelist": _typed_list,
            "torch.jit._pickle.build_boollist": _typed_list,
            "torch.jit._pickle.build_tensorlist": _typed_list,
            "torch.jit._pickle.build_complexlist": _typed_list,
            "torch.jit._pickle.restore_type_tag": _restore_type_tag,
            "numpy.dtype": _numpy_dtype,
            "numpy.core.multiarray.scalar": _numpy_scalar,
            "numpy._core.multiarray.scalar": _numpy_scalar,
        }

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        full = f"{module}.{name}"
        if full in self._safe:
            return self._safe[full]
        if module in ("torch", "torch.storage") and name in STORAGE_CLASS_DTYPES:
            return StorageType(STORAGE_CLASS_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPE_NAMES:
            return TorchDType(_DTYPE_ALIASES.get(name, name))
        # Protocol 4 walks a dotted name as attributes from the module (gzip + os.system is os.system): keep where
        # the import ends and the attribute walk begins, so that the name is judged as the unpickler resolves it.
        recorded = recorded_name(module, name)
        if recorded not in self._placeholders:
            self._placeholders[recorded] = placeholder_class(recorded)
            self.untrusted_globals.append(recorded)
        return self._placeholders[recorded]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            return pid[1]  # legacy files name a pickled module's class (and its source) this way
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CorruptCheckpointError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, *view = pid
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise CorruptCheckpointError(f"malformed storage record {pid!r:.80}")
        offset = 0
        if view and view[0] is not None:
            if not (isinstance(view[0], tuple) and len(view[0]) == 3 and type(view[0][1]) is int):
                raise CorruptCheckpointError(f"malformed storage view {pid!r:.80}")
            offset = view[0][1]
        storage = StorageRef(key=key, dtype=storage_type.dtype, numel=numel, element_offset=offset)
        self.storages.setdefault(key, storage)
        return storage

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None) -> TensorRef:
        if not isinstance(storage, StorageRef) or type(offset) is not int:
            raise CorruptCheckpointError("malformed tensor record: no storage or offset")
        return self._make_tensor(
            storage, offset, _int_tuple(size, "size"), _int_tuple(stride, "stride"), dtype or storage.dtype
        )

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
        return self._tensor(storage, offset, size, stride)

    def _rebuild_tensor_v2(
        self, storage: Any, offset: Any, size: Any, stride: Any, *_grad_hooks_metadata: Any
    ) -> TensorRef:
        return self._tensor(storage, offset, size, stride)

    def _rebuild_tensor_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
    ) -> TensorRef:
        if not isinstance(dtype, TorchDType):
            raise CorruptCheckpointError(f"malformed tensor record: dtype {dtype!r:.40}")
        return self._tensor(storage, offset, size, stride, dtype.name)

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        # Protocol 0/1 pickles build objects through copyreg; only our own placeholders may be built this way.
        if isinstance(cls, type) and issubclass(cls, Placeholder):
            return cls(state=state)
        return self.find_class("copyreg", "_reconstructor")(cls, base, state)


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 writes bytes objects as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CorruptCheckpointError("unexpected _codecs.encode call in pickle")
    return text.encode("latin-1")


def _typed_list(values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise CorruptCheckpointError("malformed TorchScript list record")
    return values


def _restore_type_tag(value: Any, _type_name: Any) -> Any:
    return value


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_meta_tensor(dtype: Any, size: Any, stride: Any, *_requires_grad: Any) -> TensorRef:
    if not isinstance(dtype, TorchDType):
        raise CorruptCheckpointError(f"malformed meta tensor record: dtype {dtype!r:.40}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    view_span(0, shape, strides, dtype.name)  # the same sanity checks as a tensor with storage
    return without_data(dtype.name, shape, "meta-device tensor")


def _uninitialised(reason: str) -> Callable[..., TensorRef]:
    def rebuild(*_requires_grad: Any, **_: Any) -> TensorRef:
        # torch rebuilds it as torch.empty(0) of the default dtype (float32 unless the loading code changed it)
        return without_data("float32", (0,), reason)

    return rebuild


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    # ``func`` came from find_class: one of our stand-ins or a placeholder; calling either runs nothing of the file.
    if not callable(func) or not isinstance(args, tuple):
        raise CorruptCheckpointError("malformed tensor-subclass record")
    return func(*args)


def _numpy_dtype(spec: Any, *_: Any) -> np.dtype[Any]:
    if not isinstance(spec, str) or np.dtype(spec).kind in "OV":
        raise CorruptCheckpointError(f"unsupported numpy dtype {spec!r:.40} in pickle")
    return np.dtype(spec)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind in "OV" or not isinstance(data, bytes):
        raise CorruptCheckpointError("unsupported numpy scalar in pickle")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


# What follows each opcode byte: a fixed number of argument bytes (>= 0), or one of these kinds.
_UNKNOWN, _STOP, _LONG_BINPUT, _FRAME, _LINE, _PUT_LINE, _TWO_LINES = -1, -2, -3, -4, -5, -6, -7
_COUNTED = {-10: (1, False), -11: (4, True), -12: (4, False), -13: (8, False)}  # length width and signedness
_PICKLETOOLS_COUNTS = {-2: -10, -3: -11, -4: -12, -5: -13}  # pickletools' n for counted arguments -> our kind


def _opcode_kinds() -> list[int]:
    kinds = [_UNKNOWN] * 256
    special = {"STOP": _STOP, "LONG_BINPUT": _LONG_BINPUT, "FRAME": _FRAME, "PUT": _PUT_LINE}
    for op in pickletools.opcodes:
        size = op.arg.n if op.arg else 0
        if op.name in special:
            kind = special[op.name]
        elif op.name in ("GLOBAL", "INST"):  # module and name: two lines
            kind = _TWO_LINES
        else:
            kind = _LINE if size == -1 else _PICKLETOOLS_COUNTS.get(size, size)
        kinds[op.code.encode("latin-1")[0]] = kind
    return kinds


_KINDS = _opcode_kinds()
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}  # for the error messages


def _fixed_size_run(end: int) -> re.Pattern[bytes]:
    """A run of opcodes of fixed size, matched by the regular-expression engine in one call: most of a torch pickle.
    LONG_BINPUT joins the run when its slot is certainly within a pickle of ``end`` bytes (its top byte zero and its
    third below ``end >> 16``); any other slot, and every opcode of variable size, is left to check_sizes' loop."""
    by_size: dict[int, list[int]] = {}
    for code, kind in enumerate(_KINDS):
        if kind >= 0:
            by_size.setdefault(kind, []).append(code)
    branches = [
        b"[" + b"".join(re.escape(bytes([c])) for c in codes) + b"]" + b"." * size for size, codes in by_size.items()
    ]
    high = min(end >> 16, 256)
    if high > 0:
        branches.append(b"r..[\x00-" + re.escape(bytes([high - 1])) + b"]\x00")
    return re.compile(b"(?:" + b"|".join(branches) + b")*", re.DOTALL)


def check_sizes(data: bytes) -> None:
    """Refuse a pickle whose memo slots, frames or lengths exceed the pickle itself: the C unpickler would grow its
    memo to that slot or allocate that length (gigabytes, touched page by page) before noticing that the data
    cannot hold it. A memo slot can never exceed the pickle's length, nor a length what is left of it.

    Walks the opcodes without building their arguments: runs of fixed-size opcodes (most of a torch pickle) in one
    regular-expression match each, the others one by one; stops at STOP or at the first byte it cannot decode,
    which the unpickler itself then refuses.
    """
    kinds = _KINDS
    end = len(data)
    fixed_run = _fixed_size_run(end).match
    position = 0
    while position < end:
        position = fixed_run(data, position).end()  # type: ignore[union-attr]  # a * pattern always matches
        if position >= end:
            return
        opcode = data[position]
        kind = kinds[opcode]
        position += 1
        if kind >= 0:  # cut short by the end of the data
            position += kind
        elif kind == _LONG_BINPUT:
            value = int.from_bytes(data[position : position + 4], "little")
            position += 4
            if value > end:
                raise CorruptCheckpointError(f"pickle LONG_BINPUT of {value} exceeds the pickle")
        elif kind <= -10:
            width, signed = _COUNTED[kind]
            length = int.from_bytes(data[position : position + width], "little", signed=signed)
            position += width
            if length < 0 or length > end - position:
                raise CorruptCheckpointError(
                    f"pickle {_NAMES[opcode]} declares {length} bytes, more than the pickle holds"
                )
            position += length
        elif kind == _FRAME:
            value = int.from_bytes(data[position : position + 8], "little")
            position += 8
            if value > end - position:
                raise CorruptCheckpointError(f"pickle FRAME of {value} exceeds the pickle")
        elif kind in (_LINE, _PUT_LINE, _TWO_LINES):
            line_end = data.find(b"\n", position)
            if kind == _TWO_LINES and line_end >= 0:
                line_end = data.find(b"\n", line_end + 1)
            if line_end < 0:
                return
            line = data[position:line_end]
            if kind == _PUT_LINE and line.isdigit() and int(line) > end:
                raise CorruptCheckpointError("pickle stores into a memo slot beyond any real pickle")
            position = line_end + 1
        else:  # STOP, or a byte that is no opcode
            return


def unpickle(
    data: bytes | IO[bytes],
    make_tensor: TensorFactory,
    *,
    storages: dict[str, StorageRef] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
) -> tuple[Any, tuple[str, ...]]:
    """The object tree of a torch pickle and the untrusted globals it named; nothing in it is executed.

    ``data`` may be a file object positioned at the pickle; it is left just after the pickle's STOP. ``storages``
    receives every storage record by key. ``persistent_load`` replaces the resolution of persistent ids for a
    format whose ids are not torch's storage records (the tar format names tensors by key).
    """
    if isinstance(data, bytes):
        check_sizes(data)
    unpickler_class: type[RestrictedUnpickler] = RestrictedUnpickler
    if persistent_load is not None:  # the C unpickler binds persistent_load when it is created: subclass it
        unpickler_class = type("Unpickler", (RestrictedUnpickler,), {"persistent_load": staticmethod(persistent_load)})
    unpickler = unpickler_class(data, make_tensor)
    collecting = gc.isenabled()
    gc.disable()  # a pickle builds a tree of many small objects: cycle collections during the load are wasted work
    try:
        with invalid_escapes_refused():
            root = unpickler.load()
    except PICKLE_ERRORS as exc:
        raise CorruptCheckpointError(f"cannot parse pickle: {type(exc).__name__}: {exc}"[:300]) from exc
    finally:
        # The unpickler refers to itself (its table of stand-ins holds its bound methods) and its memo to every
        # object of the tree: unbroken, that cycle kept the whole tree of a checkpoint (390,000 objects for 4,000
        # layers) for the cyclic collector to find, after the report was built.
        unpickler.memo.clear()
        unpickler._safe.clear()
        if collecting:
            gc.enable()
    if storages is not None:
        storages.update(unpickler.storages)
    return root, tuple(unpickler.untrusted_globals)
